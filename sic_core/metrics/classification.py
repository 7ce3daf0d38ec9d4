"""Classification metrics."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["auroc", "balanced_accuracy", "expected_calibration_error", "reliability_bins"]


def _binary_auroc(scores: Tensor, positive: Tensor) -> float:
    """Mann-Whitney AUROC: P(score of a random positive > a random negative), ties count 1/2."""
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    sorted_scores, sort_index = scores.double().sort()
    # Tied scores share their average rank, so ties count 1/2.
    _, inverse, counts = torch.unique_consecutive(
        sorted_scores, return_inverse=True, return_counts=True
    )
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(sorted_scores)
    ranks[sort_index] = average_rank[inverse]
    rank_sum = ranks[positive.bool()].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def auroc(logits: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve.

    Binary (``C = 2``): AUROC of ``z_1 - z_0`` for class 1. Multi-class: the mean of
    one-vs-rest AUROCs of ``z_c`` over the classes present with both outcomes. ``nan`` when
    only one class is present.

    Parameters
    ----------
    logits
        ``(N, C)`` scores.
    labels
        ``(N,)`` integer classes.
    """
    logits = logits.detach().float().cpu()
    labels = labels.detach().long().cpu()
    if logits.shape[1] == 2:
        return _binary_auroc(logits[:, 1] - logits[:, 0], labels == 1)
    values = [_binary_auroc(logits[:, c], labels == c) for c in range(logits.shape[1])]
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def balanced_accuracy(predicted: Tensor, labels: Tensor) -> float:
    """Mean over the classes present of the recall ``TP_c / N_c``."""
    predicted = predicted.detach().long().cpu()
    labels = labels.detach().long().cpu()
    recalls = [
        (predicted[labels == c] == c).double().mean().item() for c in labels.unique().tolist()
    ]
    return sum(recalls) / len(recalls) if recalls else math.nan


def reliability_bins(
    probabilities: Tensor, labels: Tensor, bins: int = 15
) -> list[dict[str, float]]:
    """Accuracy and mean confidence per equal-width confidence bin (the reliability diagram).

    Confidence is the predicted class's probability ``p_max``; SIC's per-class probabilities
    are independent sigmoids, so they are normalised over classes first. Empty bins are left
    out.

    Parameters
    ----------
    probabilities
        ``(N, C)`` non-negative scores per class (e.g. ``sigmoid(z)``).
    labels
        ``(N,)`` integer classes.

    Returns
    -------
    list of dict
        ``{"lower", "upper", "confidence", "accuracy", "share"}`` per non-empty bin, where
        ``share = n_b / N``.
    """
    probabilities = probabilities.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if probabilities.shape[0] == 0:
        return []
    normalised = probabilities / probabilities.sum(dim=1, keepdim=True).clamp_min(1e-12)
    confidence, predicted = normalised.max(dim=1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    index = torch.bucketize(confidence, edges[1:-1], right=True)
    rows = []
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            rows.append(
                {
                    "lower": float(edges[b]),
                    "upper": float(edges[b + 1]),
                    "confidence": float(confidence[in_bin].mean()),
                    "accuracy": float(correct[in_bin].mean()),
                    "share": float(in_bin.double().mean()),
                }
            )
    return rows


def expected_calibration_error(probabilities: Tensor, labels: Tensor, bins: int = 15) -> float:
    """ECE = sum_b (n_b / N) |accuracy_b - confidence_b| over ``bins`` equal-width bins.

    The bins are those of :func:`reliability_bins` (``nan`` for no images).
    """
    rows = reliability_bins(probabilities, labels, bins)
    if not rows:
        return math.nan
    return sum(row["share"] * abs(row["accuracy"] - row["confidence"]) for row in rows)
