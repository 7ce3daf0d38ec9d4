"""Explanation-quality metrics that only read contribution maps and evidence.

Notation (METRICS.md): ``R`` is a contribution map ``(H, W)`` (per image), ``R+ = max(R, 0)``,
``M`` a binary mask, ``|M|`` its pixel count, ``HW`` the image area. All functions are batched
over a leading image dimension and return plain floats or CPU tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sic_core.explanations import Explanation

__all__ = [
    "completeness_max_rel_err",
    "evidence_concentration",
    "gini",
    "mass_lift",
    "pointing_game",
    "robust_z",
    "spearman",
    "support_jaccard",
    "top_support_agreement",
]

_EPS = 1e-12


def completeness_max_rel_err(explanation: Explanation, *, eps: float = 1e-6) -> float:
    """Largest completeness violation over a batch (a hard gate: < 1e-4 in float32).

    ``max_i,c |sum_p R^c_p - (z_c - b)| / max(|z_c - b|, eps)`` together with
    ``max_i,c |sum_k in c e_k + b - z_c|`` (the second is absolute: logits are O(1)).

    ``z_c - b`` is taken as the class's summed evidence ``sum_k in c e_k`` (the second check
    ties that to the logit), not computed as ``logits - bias``: a confident model gives a
    class evidence of ~1e-6, and a float32 logit near ``b = -ln 2`` carries only ~6e-8 of
    it, so subtracting the bias again turned a rounding error into a "relative error" of 1e-2
    (measured on a demo model whose maps match the evidence to 1.4e-6, and to 1e-11 in
    float64).
    """
    class_evidence = torch.stack([e.sum(dim=1) for e in explanation.evidence_by_class()], dim=1)
    map_sums = explanation.class_maps.sum(dim=(2, 3))
    map_error = (map_sums - class_evidence).abs() / class_evidence.abs().clamp_min(eps)
    evidence_error = (class_evidence + explanation.bias - explanation.logits).abs()
    return float(torch.maximum(map_error.max(), evidence_error.max()))


def mass_lift(maps: Tensor, masks: Tensor) -> Tensor:
    """Relevance-mass lift per image: ``(sum_{p in M} R+ / sum_p R+) / (|M| / HW)``.

    1 means the positive evidence is spread like the mask's area share; a map entirely inside
    the mask gives ``HW / |M|``. Images with an empty mask or no positive evidence give NaN.

    Parameters
    ----------
    maps
        ``(B, H, W)`` contribution maps.
    masks
        ``(B, H, W)`` binary masks (lesion: localisation; marker/text: shortcut mass).
    """
    positive = maps.clamp_min(0)
    masks = masks.to(positive.dtype)
    total = positive.sum(dim=(1, 2))
    share = (positive * masks).sum(dim=(1, 2)) / total.clamp_min(_EPS)
    area = masks.mean(dim=(1, 2))
    lift = share / area.clamp_min(_EPS)
    invalid = (area == 0) | (total <= 0)
    return torch.where(invalid, torch.full_like(lift, math.nan), lift)


def pointing_game(maps: Tensor, masks: Tensor, *, tolerance: int = 3) -> tuple[float, float]:
    """Share of images whose map maximum lies inside the mask dilated by ``tolerance`` pixels.

    Returns
    -------
    tuple[float, float]
        ``(hit rate, area baseline)``: the baseline is the mean dilated-mask area share, the
        hit rate of a uniformly random point.
    """
    if maps.shape[0] == 0:
        return math.nan, math.nan
    size = 2 * tolerance + 1
    dilated = F.max_pool2d(masks.float().unsqueeze(1), size, stride=1, padding=tolerance)[:, 0]
    flat = maps.flatten(1).argmax(dim=1)
    hits = dilated.flatten(1).gather(1, flat[:, None]).squeeze(1) > 0
    return float(hits.float().mean()), float(dilated.mean())


def gini(maps: Tensor) -> Tensor:
    """Gini sparseness of ``|R|`` per image (0: uniform, towards 1: concentrated).

    ``G = sum_i (2i - n - 1) a_(i) / (n sum_i a_(i))`` with ``a`` sorted ascending, ``i = 1..n``.
    """
    values = maps.abs().flatten(1).sort(dim=1).values.double()
    n = values.shape[1]
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1
    total = values.sum(dim=1)
    return ((values * weights).sum(dim=1) / (n * total.clamp_min(_EPS))).float()


def evidence_concentration(evidence: Tensor) -> float:
    """Mean over images of ``max_k |e_k| / sum_k |e_k|`` (1: one support carries everything)."""
    magnitude = evidence.abs()
    return float((magnitude.max(dim=1).values / magnitude.sum(dim=1).clamp_min(_EPS)).mean())


def support_jaccard(
    previous: Tensor, current: Tensor, labels: Tensor, num_classes: int
) -> list[float]:
    """Per class, Jaccard index of this round's and last round's support image ids.

    ``|A ∩ B| / |A ∪ B|`` over the distinct non-negative ids of each class's supports.
    """
    scores = []
    for c in range(num_classes):
        before = {int(i) for i in previous[labels == c] if i >= 0}
        after = {int(i) for i in current[labels == c] if i >= 0}
        union = before | after
        scores.append(len(before & after) / len(union) if union else math.nan)
    return scores


def top_support_agreement(previous_top: Tensor, current_top: Tensor) -> float:
    """Share of audit images whose top support (nearest local case id) is unchanged."""
    if previous_top.numel() == 0:
        return math.nan
    return float((previous_top == current_top).float().mean())


def _ranks(values: Tensor) -> Tensor:
    order = values.argsort(dim=1)
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks.scatter_(1, order, torch.arange(values.shape[1], dtype=torch.float64).expand_as(ranks))
    return ranks


def spearman(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation per image of two ``(B, ...)`` maps (ties broken by order)."""
    a = _ranks(first.flatten(1).double())
    b = _ranks(second.flatten(1).double())
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return ((a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)).float()


def robust_z(values: Tensor) -> Tensor:
    """Robust z-scores ``(v - median) / (1.4826 MAD)``; a site is flagged above 3."""
    values = values.double()
    median = values.median()
    mad = (values - median).abs().median() * 1.4826
    return ((values - median) / mad.clamp_min(_EPS)).float()
