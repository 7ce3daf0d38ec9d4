"""The site's per-round explanation audit."""

from __future__ import annotations

import copy
import math

import torch

from client.audit import audit_metrics, select_audit_set
from client.synth.render import public_marker_mask
from sic_core import create_model
from sic_core.wire import xai_metric_keys


def _split(n: int = 40, size: int = 24):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=generator)
    labels = torch.arange(n) % 2
    lesion = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    lesion[labels == 1, :, 8:14, 8:14] = 1
    marker = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    marker[::4, :, 1:4, 1:10] = 1
    return images, labels, {"lesion": lesion, "marker": marker}


def test_audit_set_is_stratified_deterministic_and_versioned() -> None:
    images, labels, masks = _split()
    first = select_audit_set(images, labels, masks, size=10, seed=3)
    again = select_audit_set(images, labels, masks, size=10, seed=3)
    assert torch.equal(first.indices, again.indices) and first.version == again.version
    assert first.labels.bincount().tolist() == [5, 5]
    assert torch.equal(first.images, images[first.indices])
    assert torch.equal(first.lesion, masks["lesion"][first.indices, 0].bool())
    assert select_audit_set(images, labels, masks, size=12, seed=3).version != first.version
    everything = select_audit_set(images, labels, {}, size=100, seed=0)
    assert everything.indices.tolist() == list(range(40)) and not everything.marker.any()


def test_audit_metrics_cover_the_dashboard_and_track_stability() -> None:
    torch.manual_seed(0)
    images, labels, masks = _split()
    audit = select_audit_set(images, labels, masks, size=16, seed=0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=2, proj_dim=16, width=8)
    model.set_support(torch.rand(4, 16) + 0.1, torch.tensor([0, 0, 1, 1]))
    global_model = copy.deepcopy(model)
    global_model.set_support(torch.rand(4, 16) + 0.1, torch.tensor([0, 0, 1, 1]))
    ids = torch.tensor([3, 7, 8, 12])
    first, state = audit_metrics(
        model,
        audit,
        support_ids=ids,
        previous=None,
        global_model=global_model,
        probe=images[:4],
        steps=4,
    )
    expected_keys = {
        "xai/completeness_max_rel_err",
        "xai/support_jaccard/c0",
        "xai/support_jaccard/c1",
        "xai/top_support_agreement",
        "xai/evidence_concentration",
        "xai/rma_lift",
        "xai/pointing_game",
        "xai/drift_to_global",
        "xai/deletion_auc",
        "xai/insertion_auc",
        "xai/max_sensitivity",
        "xai/dp_noise_rank_corr",
        "xai/artifact_mass_lift",
        "xai/marker_counterfactual_shift",
        "xai/gini",
    }
    assert expected_keys <= set(first)
    assert set(first) == xai_metric_keys(2)  # exactly the wire schema
    assert first["xai/completeness_max_rel_err"] < 1e-4
    assert math.isnan(first["xai/top_support_agreement"])
    assert math.isfinite(first["xai/drift_to_global"]) and math.isfinite(
        first["xai/artifact_mass_lift"]
    )
    second, _ = audit_metrics(model, audit, support_ids=ids, previous=state, steps=4)
    assert second["xai/top_support_agreement"] == 1.0
    assert second["xai/support_jaccard/c0"] == 1.0
    assert math.isnan(second["xai/drift_to_global"])
    moved, _ = audit_metrics(model, audit, support_ids=ids + 100, previous=state, steps=4)
    assert moved["xai/support_jaccard/c1"] == 0.0 and moved["xai/top_support_agreement"] == 0.0


def test_a_site_without_markers_measures_shortcuts_on_the_public_marker_pasted_in() -> None:
    images, labels, masks = _split()
    del masks["marker"]
    audit = select_audit_set(images, labels, masks, size=16, seed=0)
    assert not audit.marker.any()
    model = create_model("bcos_cnn_small", 1, 2, n_shot=2, proj_dim=16, width=8)
    model.set_support(torch.rand(4, 16) + 0.1, torch.tensor([0, 0, 1, 1]))
    metrics, _ = audit_metrics(
        model, audit, support_ids=torch.arange(4), previous=None, steps=4, pasted_images=4
    )
    assert math.isfinite(metrics["xai/artifact_mass_lift"])
    assert math.isfinite(metrics["xai/marker_counterfactual_shift"])
    assert public_marker_mask(images.shape[-1]).any()
    # A small text in the top-right corner, as SynthCXR burns it in.
    mask = public_marker_mask(64)
    rows, cols = mask.nonzero()
    assert 0 < mask.mean() < 0.03 and rows.max() < 16 and cols.min() > 32
