"""Support selection: real embeddings, class order, determinism, edge cases, federated merge."""

from __future__ import annotations

import torch

from sic_core import (
    cluster_statistics,
    merge_cluster_statistics,
    nearest_local_support,
    select_support,
)
from sic_core.support import ClusterStatistics, anchor_support


def _data(n: int = 60, dim: int = 8, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    embeddings = torch.rand(n, dim, generator=generator) + labels[:, None].float()
    return embeddings, labels


def _assert_real_and_ordered(support, embeddings, labels, classes: int, n_shot: int) -> None:
    assert support.vectors.shape == (classes * n_shot, embeddings.shape[1])
    assert torch.equal(support.labels, torch.arange(classes).repeat_interleave(n_shot))
    for k in range(support.vectors.shape[0]):
        index = int(support.indices[k])
        if index >= 0:
            assert torch.equal(support.vectors[k], embeddings[index])
            assert labels[index] == support.labels[k]


def test_supports_are_real_embeddings_in_class_order_and_deterministic() -> None:
    embeddings, labels = _data()
    first = select_support(embeddings, labels, 3, 3, seed=4)
    _assert_real_and_ordered(first, embeddings, labels, 3, 3)
    assert (first.indices >= 0).all()
    second = select_support(embeddings, labels, 3, 3, seed=4)
    assert torch.equal(first.indices, second.indices)


def test_n_shot_one() -> None:
    embeddings, labels = _data()
    support = select_support(embeddings, labels, 3, 1)
    _assert_real_and_ordered(support, embeddings, labels, 3, 1)
    assert (support.indices >= 0).all()


def test_class_with_fewer_images_than_n_shot_and_duplicates() -> None:
    embeddings, labels = _data()
    keep = (labels != 2) | (torch.arange(60) == 2)  # class 2 keeps a single image
    embeddings, labels = embeddings[keep], labels[keep]
    duplicated = torch.cat([embeddings, embeddings[:6]])
    duplicated_labels = torch.cat([labels, labels[:6]])
    support = select_support(duplicated, duplicated_labels, 3, 3)
    _assert_real_and_ordered(support, duplicated, duplicated_labels, 3, 3)
    class_two = support.vectors[support.labels == 2]
    assert torch.equal(class_two, class_two[:1].expand(3, -1))


def test_absent_class_uses_fallback_or_zero_vectors() -> None:
    embeddings, labels = _data()
    keep = labels != 1
    embeddings, labels = embeddings[keep], labels[keep]
    zero_filled = select_support(embeddings, labels, 3, 2)
    assert (zero_filled.indices[2:4] == -1).all()
    assert (zero_filled.vectors[2:4] == 0).all()
    fallback = torch.full((6, 8), 0.5)
    filled = select_support(embeddings, labels, 3, 2, fallback=fallback)
    assert torch.equal(filled.vectors[2:4], fallback[2:4])
    _assert_real_and_ordered(filled, embeddings, labels, 3, 2)


def test_nearest_local_support_picks_the_closest_same_class_embedding() -> None:
    embeddings, labels = _data()
    centroids = torch.stack([embeddings[5] + 0.001, embeddings[7] - 0.001])
    support = nearest_local_support(centroids, torch.tensor([2, 1]), embeddings, labels)
    assert support.indices.tolist() == [5, 7]


def test_nearest_local_support_by_angle_ignores_a_short_centroid() -> None:
    # A DP centroid of clipped embeddings is short: by distance it would pick the shortest
    # embedding of the class, by angle the one pointing its way.
    embeddings = torch.tensor([[10.0, 1.0], [0.5, 0.5], [1.0, 10.0]])
    labels = torch.zeros(3, dtype=torch.long)
    centroid = torch.tensor([[0.9, 0.1]])
    by_distance = nearest_local_support(centroid, torch.tensor([0]), embeddings, labels)
    by_angle = nearest_local_support(centroid, torch.tensor([0]), embeddings, labels, by="angle")
    assert by_distance.indices.tolist() == [1]
    assert by_angle.indices.tolist() == [0]


def test_cluster_statistics_are_aggregates_and_merge_is_order_free() -> None:
    embeddings, labels = _data(90)
    site_a = cluster_statistics(embeddings[:50], labels[:50], 3, 2)
    site_b = cluster_statistics(embeddings[50:], labels[50:], 3, 2)
    for site, part in ((site_a, labels[:50]), (site_b, labels[50:])):
        assert site.sums.shape == (3, 2, 8)
        for c in range(3):
            assert site.counts[c].sum() == (part == c).sum()
    merged = merge_cluster_statistics([site_a, site_b], 2, seed=0)
    swapped = merge_cluster_statistics([site_b, site_a], 2, seed=0)
    torch.testing.assert_close(merged.vectors, swapped.vectors)
    assert torch.equal(merged.labels, torch.arange(3).repeat_interleave(2))
    # Each global vector lies within its class's range of embeddings.
    for k in range(6):
        c = int(merged.labels[k])
        members = embeddings[labels == c]
        assert (merged.vectors[k] >= members.min(0).values - 1e-5).all()
        assert (merged.vectors[k] <= members.max(0).values + 1e-5).all()


def test_merge_with_a_class_missing_at_one_site() -> None:
    embeddings, labels = _data(60)
    without_two = labels != 2
    site_a = cluster_statistics(embeddings[without_two], labels[without_two], 3, 2)
    assert site_a.counts[2].sum() == 0
    site_b = cluster_statistics(embeddings, labels, 3, 2)
    merged = merge_cluster_statistics([site_a, site_b], 2)
    assert torch.isfinite(merged.vectors).all()
    assert (merged.vectors[4:6].norm(dim=1) > 0).all()
    nobody = ClusterStatistics(sums=torch.zeros(3, 2, 8), counts=torch.zeros(3, 2))
    assert (merge_cluster_statistics([nobody], 2).vectors == 0).all()


def test_anchor_supports_are_disjoint_per_class() -> None:
    anchors = anchor_support(3, 2, 12, seed=0)
    assert (anchors.vectors >= 0).all()
    gram = anchors.vectors @ anchors.vectors.T
    same_class = anchors.labels[:, None] == anchors.labels[None, :]
    assert (gram[~same_class] == 0).all()
    assert (gram[same_class] > 0).all()
