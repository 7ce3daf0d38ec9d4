"""Support vectors: per-class k-means, the nearest real embedding, federated merging.

Site-local rule (the reference's "closest" rule): every support vector a clinician sees is
the embedding of a real training image of that site, the one nearest (Euclidean) to a class
centroid. Federated rule: sites send per-class cluster sums and counts (aggregates, never
per-image embeddings); the server merges the site centroids by weighted k-means.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from sic_core.model import SICModel

__all__ = [
    "ClusterStatistics",
    "SupportSet",
    "anchor_support",
    "cluster_statistics",
    "embed_all",
    "kmeans_centroids",
    "merge_cluster_statistics",
    "nearest_local_support",
    "select_support",
]

NO_INDEX = -1


@dataclass(frozen=True)
class SupportSet:
    """A labelled support set in class order.

    Attributes
    ----------
    vectors
        ``(K, D)`` float32 support vectors.
    labels
        ``(K,)`` int64 class of each vector, non-decreasing.
    indices
        ``(K,)`` int64 index of the real embedding each vector is, or ``-1`` where the class
        has no local image (the vector is then the given centroid or fallback).
    """

    vectors: Tensor
    labels: Tensor
    indices: Tensor


@dataclass(frozen=True)
class ClusterStatistics:
    """Per-class cluster sums ``(C, n_shot, D)`` and counts ``(C, n_shot)`` of one site."""

    sums: Tensor
    counts: Tensor


@torch.no_grad()
def embed_all(model: SICModel, images: Tensor, batch_size: int = 128) -> Tensor:
    """Embed ``images (N, C_in, H, W)`` in batches on the model's device; returns ``(N, D)`` CPU."""
    device = model.support_vectors.device
    was_training = model.training
    model.eval()
    try:
        chunks = [
            model.embed(images[start : start + batch_size].to(device)).cpu()
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.zeros(0, model.config.proj_dim)
    return torch.cat(chunks)


def kmeans_centroids(
    points: Tensor, n_clusters: int, *, seed: int = 0, weights: Tensor | None = None
) -> Tensor:
    """K-means centroids ``(n_clusters, D)`` (fixed seed, ``n_init=10``), sorted for determinism.

    With fewer distinct points than clusters, the distinct points are repeated cyclically so
    the result always has ``n_clusters`` rows.
    """
    data = points.detach().double().cpu().numpy()
    distinct, first = np.unique(data, axis=0, return_index=True)
    distinct = distinct[np.argsort(first)]
    if len(distinct) <= n_clusters:
        repeats = np.resize(np.arange(len(distinct)), n_clusters)
        return torch.from_numpy(distinct[repeats]).float()
    sample_weight = None if weights is None else weights.detach().double().cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fitted = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(
            data, sample_weight=sample_weight
        )
    centres = fitted.cluster_centers_
    order = np.lexsort(centres.T[::-1])
    return torch.from_numpy(centres[order]).float()


def nearest_local_support(
    vectors: Tensor,
    labels: Tensor,
    embeddings: Tensor,
    embedding_labels: Tensor,
    *,
    by: str = "distance",
) -> SupportSet:
    """Replace each centroid by the nearest same-class real embedding.

    Parameters
    ----------
    vectors
        ``(K, D)`` centroids (e.g. the global support vectors).
    labels
        ``(K,)`` class of each centroid.
    embeddings
        ``(N, D)`` the site's training embeddings.
    embedding_labels
        ``(N,)`` their classes.
    by
        ``"distance"`` (Euclidean, the reference's rule for k-means centroids of the
        embeddings themselves) or ``"angle"`` (smallest angle: the model's similarity
        ignores a support vector's length, and a DP-released centroid of clipped
        embeddings is much shorter than the embeddings, so by distance it would pick the
        shortest embeddings of the class instead of the most similar ones).

    Returns
    -------
    SupportSet
        A class whose site has no image keeps its centroid, with index ``-1``.
    """
    if by not in ("distance", "angle"):
        raise ValueError(f"by: expected 'distance' or 'angle', got {by!r}")
    chosen_vectors = vectors.detach().clone().float()
    indices = torch.full((vectors.shape[0],), NO_INDEX, dtype=torch.long)
    for k in range(vectors.shape[0]):
        candidates = torch.nonzero(embedding_labels == labels[k]).flatten()
        if candidates.numel() == 0:
            continue
        centroid, members = vectors[k : k + 1].float(), embeddings[candidates].float()
        if by == "angle":
            distances = -torch.nn.functional.cosine_similarity(members, centroid, dim=1)
        else:
            distances = torch.cdist(centroid, members)
        best = candidates[int(distances.argmin())]
        indices[k] = best
        chosen_vectors[k] = embeddings[best]
    return SupportSet(vectors=chosen_vectors, labels=labels.clone().long(), indices=indices)


def select_support(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int,
    n_shot: int,
    *,
    seed: int = 0,
    fallback: Tensor | None = None,
) -> SupportSet:
    """Site-local support selection: per class, k-means then the nearest real embedding.

    Parameters
    ----------
    embeddings
        ``(N, D)`` training embeddings.
    labels
        ``(N,)`` their classes in ``[0, num_classes)``.
    num_classes, n_shot
        ``K = num_classes * n_shot`` supports, in class order.
    seed
        K-means seed (results are deterministic for a seed).
    fallback
        Optional ``(K, D)`` vectors used for classes absent here (e.g. global supports);
        without it an absent class gets zero vectors (evidence 0, so its logit is ``b``).
    """
    dim = embeddings.shape[1]
    centroids = torch.zeros(num_classes * n_shot, dim)
    if fallback is not None:
        centroids = fallback.detach().clone().float()
    for c in range(num_classes):
        members = embeddings[labels == c]
        if members.shape[0]:
            centroids[c * n_shot : (c + 1) * n_shot] = kmeans_centroids(members, n_shot, seed=seed)
    support_labels = torch.arange(num_classes).repeat_interleave(n_shot)
    return nearest_local_support(centroids, support_labels, embeddings, labels)


def cluster_statistics(
    embeddings: Tensor, labels: Tensor, num_classes: int, n_shot: int, *, seed: int = 0
) -> ClusterStatistics:
    """Per-class k-means at a site, reported as cluster sums and counts (no single embedding).

    Returns
    -------
    ClusterStatistics
        ``sums (C, n_shot, D)`` and ``counts (C, n_shot)``; a class absent here has zero counts.
    """
    dim = embeddings.shape[1]
    sums = torch.zeros(num_classes, n_shot, dim)
    counts = torch.zeros(num_classes, n_shot)
    for c in range(num_classes):
        members = embeddings[labels == c].float()
        if members.shape[0] == 0:
            continue
        centres = kmeans_centroids(members, min(n_shot, members.shape[0]), seed=seed)
        assignment = torch.cdist(members, centres).argmin(dim=1)
        for j in range(centres.shape[0]):
            mine = members[assignment == j]
            sums[c, j] = mine.sum(dim=0)
            counts[c, j] = mine.shape[0]
    return ClusterStatistics(sums=sums, counts=counts)


def merge_cluster_statistics(
    statistics: list[ClusterStatistics], n_shot: int, *, seed: int = 0
) -> SupportSet:
    """Merge sites' cluster statistics into ``n_shot`` global support vectors per class.

    Per class, every site cluster with a count of at least 1 contributes its centroid
    ``sum / count`` with weight ``count``; weighted k-means over those centroids gives the
    global vectors. A class no site has gets zero vectors (index ``-1`` throughout: global
    vectors are no one image).
    """
    if not statistics:
        raise ValueError("merge_cluster_statistics: no site statistics to merge")
    num_classes, _, dim = statistics[0].sums.shape
    vectors = torch.zeros(num_classes * n_shot, dim)
    for c in range(num_classes):
        # A real cluster holds at least one image; DP-noised counts below 1 are noise.
        kept = [s.counts[c] >= 1 for s in statistics]
        centres = [
            s.sums[c][k] / s.counts[c][k, None] for s, k in zip(statistics, kept, strict=True)
        ]
        weights = [s.counts[c][k] for s, k in zip(statistics, kept, strict=True)]
        points = torch.cat(centres)
        if points.shape[0]:
            vectors[c * n_shot : (c + 1) * n_shot] = kmeans_centroids(
                points, n_shot, seed=seed, weights=torch.cat(weights)
            )
    labels = torch.arange(num_classes).repeat_interleave(n_shot)
    return SupportSet(
        vectors=vectors, labels=labels, indices=torch.full((num_classes * n_shot,), NO_INDEX)
    )


def anchor_support(num_classes: int, n_shot: int, dim: int, *, seed: int = 0) -> SupportSet:
    """Public, seeded anchor supports for training an encoder from scratch.

    Class ``c`` gets ``n_shot`` non-negative random vectors on its own block of
    ``dim // num_classes`` coordinates, so different classes' anchors are orthogonal.

    Why: at a randomly initialised encoder all embeddings point almost the same way, and the
    episodic objective is flat there (the kernel ``||q|| cos^2`` is second-order in angular
    differences), so episodic training from scratch collapses to equal logits. Training the
    first epochs against fixed, class-disjoint anchors is first-order in the discriminative
    direction and spreads the embeddings; episodic training then proceeds as the reference
    does. Pretrained encoders do not need it.
    """
    if dim < num_classes:
        raise ValueError(f"anchor_support: dim {dim} is smaller than num_classes {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    block = dim // num_classes
    vectors = torch.zeros(num_classes * n_shot, dim)
    for c in range(num_classes):
        vectors[c * n_shot : (c + 1) * n_shot, c * block : (c + 1) * block] = (
            torch.rand(n_shot, block, generator=generator) + 0.1
        )
    labels = torch.arange(num_classes).repeat_interleave(n_shot)
    return SupportSet(vectors=vectors, labels=labels, indices=torch.full_like(labels, NO_INDEX))
