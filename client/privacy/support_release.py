"""The DP support release: per-class cluster sums and counts through one Gaussian mechanism.

Under DP, clusters are the current global support vectors (public): each training image's
embedding is clipped to L2 norm ``clip_norm`` and added to the sum of its nearest global
support vector of its own class, and counted there. An image therefore changes exactly one
sum (by at most ``clip_norm``) and one count (by 1) and nothing else — local k-means would
let one image move every cluster, with no bounded sensitivity.

Noise: sums get ``N(0, (sigma * clip_norm)^2)`` and counts ``N(0, sigma^2)`` per coordinate.
On the rescaled vector ``(sums / clip_norm, counts)`` one image moves at most ``sqrt(2)`` in
L2 with noise ``sigma`` per coordinate, i.e. a Gaussian mechanism of noise multiplier
``sigma / sqrt(2)``, applied once (sample rate 1) per round; that is what the ledger records.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from client.privacy.ledger import Mechanism
from sic_core import ClusterStatistics, SupportSet

__all__ = ["plan_support_release", "private_cluster_statistics"]


def plan_support_release(*, noise_multiplier: float, run_id: str, round_: int) -> Mechanism:
    """The mechanism one support release applies (see the module docstring)."""
    return Mechanism(
        kind="support",
        run_id=run_id,
        round=round_,
        noise_multiplier=noise_multiplier / math.sqrt(2),
        sample_rate=1.0,
        steps=1,
    )


def private_cluster_statistics(
    embeddings: Tensor,
    labels: Tensor,
    global_support: SupportSet,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> ClusterStatistics:
    """Noised per-class cluster sums ``(C, n_shot, D)`` and counts ``(C, n_shot)``.

    Parameters
    ----------
    embeddings, labels
        ``(N, D)`` site training embeddings and ``(N,)`` classes.
    global_support
        The public global support vectors (class order, ``n_shot`` per class).
    clip_norm
        L2 bound applied to every embedding before summing.
    noise_multiplier
        ``sigma``; noise standard deviation is ``sigma * clip_norm`` on sums, ``sigma`` on
        counts.
    """
    vectors, support_labels = global_support.vectors.cpu(), global_support.labels.cpu()
    num_classes = int(support_labels.max()) + 1
    n_shot = int((support_labels == 0).sum())
    dim = vectors.shape[1]
    norms = embeddings.norm(dim=1, keepdim=True)
    clipped = embeddings * (clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
    sums = torch.zeros(num_classes, n_shot, dim)
    counts = torch.zeros(num_classes, n_shot)
    for c in range(num_classes):
        members = clipped[labels == c]
        if members.shape[0] == 0:
            continue
        assignment = torch.cdist(members, vectors[support_labels == c]).argmin(dim=1)
        sums[c].index_add_(0, assignment, members)
        counts[c].index_add_(0, assignment, torch.ones(members.shape[0]))
    sums = sums + torch.randn(sums.shape, generator=generator) * noise_multiplier * clip_norm
    counts = counts + torch.randn(counts.shape, generator=generator) * noise_multiplier
    return ClusterStatistics(sums=sums, counts=counts)
