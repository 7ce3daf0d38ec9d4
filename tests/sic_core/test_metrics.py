"""Explanation-quality metrics on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from sic_core import TrainConfig, create_model, explain, train_sic
from sic_core.metrics import (
    auroc,
    balanced_accuracy,
    completeness_max_rel_err,
    deletion_insertion,
    evidence_concentration,
    expected_calibration_error,
    gini,
    inpaint,
    marker_counterfactual_shift,
    mass_lift,
    max_sensitivity,
    parameter_noise_rank_correlation,
    pointing_game,
    reliability_bins,
    robust_z,
    spearman,
    support_jaccard,
    top_support_agreement,
)


def _square_masks(batch: int = 4, size: int = 16) -> torch.Tensor:
    masks = torch.zeros(batch, size, size)
    masks[:, 4:8, 4:8] = 1
    return masks


def test_mass_lift_inside_mask_is_inverse_area_share_and_random_is_about_one() -> None:
    masks = _square_masks()
    inside = torch.rand(4, 16, 16) * masks
    torch.testing.assert_close(mass_lift(inside, masks), torch.full((4,), 256 / 16))
    generator = torch.Generator().manual_seed(0)
    random_maps = torch.rand(4000, 16, 16, generator=generator)
    lift = mass_lift(random_maps, _square_masks(4000))
    assert abs(float(lift.mean()) - 1) < 0.02
    assert math.isnan(float(mass_lift(random_maps[:1], torch.zeros(1, 16, 16))[0]))


def test_pointing_game_hits_and_baseline() -> None:
    masks = _square_masks(2)
    maps = torch.zeros(2, 16, 16)
    maps[0, 5, 5] = 1  # inside
    maps[1, 15, 15] = 1  # far outside
    hit, baseline = pointing_game(maps, masks, tolerance=1)
    assert hit == 0.5
    assert baseline == pytest.approx(36 / 256)


def test_gini_uniform_zero_and_single_pixel_near_one() -> None:
    assert float(gini(torch.ones(1, 8, 8))[0]) == pytest.approx(0, abs=1e-6)
    spike = torch.zeros(1, 8, 8)
    spike[0, 3, 3] = 5
    assert float(gini(spike)[0]) == pytest.approx(1 - 1 / 64, abs=1e-6)


def test_support_stability_metrics() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    assert support_jaccard(torch.tensor([1, 2, 3, 4]), torch.tensor([2, 1, 3, 5]), labels, 2) == [
        1.0,
        pytest.approx(1 / 3),
    ]
    assert top_support_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 0])) == 0.5
    assert evidence_concentration(torch.tensor([[1.0, 0, 0], [1.0, 1.0, 2.0]])) == pytest.approx(
        0.75
    )


def test_spearman_and_robust_z() -> None:
    a = torch.rand(3, 10)
    torch.testing.assert_close(spearman(a, 2 * a + 1), torch.ones(3))
    torch.testing.assert_close(spearman(a, -a), -torch.ones(3))
    z = robust_z(torch.tensor([1.0, 1.1, 0.9, 1.05, 5.0]))
    assert z[-1] > 3 and (z[:-1].abs() < 3).all()


def test_classification_metrics() -> None:
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, -1.0], [0.0, 0.5]])
    labels = torch.tensor([1, 1, 0, 0])
    assert auroc(logits, labels) == 1.0
    assert balanced_accuracy(logits.argmax(1), labels) == 0.75
    assert math.isnan(auroc(logits, torch.ones(4, dtype=torch.long)))
    confident_right = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert expected_calibration_error(confident_right, torch.tensor([1, 0])) == pytest.approx(0)
    assert expected_calibration_error(confident_right, torch.tensor([0, 1])) == pytest.approx(1)


def test_reliability_bins_place_each_image_by_its_normalised_confidence() -> None:
    # Normalised confidences 0.9, 0.9, 0.6, 0.6: two bins, one all right, one half right.
    probabilities = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 0])
    bins = reliability_bins(probabilities, labels, bins=10)
    assert [(b["lower"], b["share"]) for b in bins] == [
        (pytest.approx(0.6), 0.5),  # bins are [lower, upper)
        (pytest.approx(0.8), 0.5),
    ]
    assert [b["accuracy"] for b in bins] == [0.5, 1.0]
    assert [b["confidence"] for b in bins] == [pytest.approx(0.6), pytest.approx(0.9)]
    # ECE = 0.5 * |0.5 - 0.6| + 0.5 * |1.0 - 0.9| = 0.1
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.1)


def _trained_like_model():
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=16, width=8)
    model.set_support(torch.rand(2, 16) + 0.1, torch.tensor([0, 1]))
    return model


def test_completeness_gate_is_tiny_for_exact_explanations_and_catches_a_broken_one() -> None:
    model = _trained_like_model()
    result = explain(model, torch.rand(3, 1, 24, 24))
    assert completeness_max_rel_err(result) < 1e-4
    broken = type(result)(**{**result.__dict__, "class_maps": result.class_maps * 1.01})
    assert completeness_max_rel_err(broken) > 1e-3


def test_completeness_of_a_confident_model_is_not_lost_to_the_bias_rounding() -> None:
    # A class with evidence 2e-6 (a confident model's other class): its float32 logit near
    # b = -ln 2 keeps only ~6e-8 of that evidence, so ``logits - bias`` is off by ~3 %
    # while the map itself sums to the evidence exactly.
    result = explain(_trained_like_model(), torch.rand(1, 1, 24, 24))
    evidence = torch.tensor([[2e-6, 5.0]])
    pixels = result.class_maps.shape[2] * result.class_maps.shape[3]
    confident = type(result)(
        **{
            **result.__dict__,
            "evidence": evidence,
            "logits": evidence + result.bias,
            "class_maps": (evidence / pixels)[:, :, None, None].expand_as(result.class_maps),
        }
    )
    assert ((confident.logits - confident.bias)[0, 0] - 2e-6).abs() > 1e-8  # the rounding
    assert completeness_max_rel_err(confident) < 1e-4
    shifted = type(result)(**{**confident.__dict__, "logits": confident.logits + 1e-3})
    assert completeness_max_rel_err(shifted) > 1e-4  # logits that disagree with the evidence


def test_deletion_of_the_true_ranking_beats_a_random_ranking() -> None:
    model = _trained_like_model()
    x = torch.rand(6, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    result = explain(model, x, target=torch.ones(6, dtype=torch.long))
    scores = deletion_insertion(model, x, result.target_maps(), result.target, steps=12)
    assert scores.deletion_auc < scores.deletion_random_auc
    assert scores.insertion_auc > scores.insertion_random_auc
    reversed_order = deletion_insertion(model, x, -result.target_maps(), result.target, steps=12)
    assert reversed_order.deletion_auc > scores.deletion_auc


def test_stability_metrics_are_finite_and_ordered() -> None:
    model = _trained_like_model()
    x = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    small = max_sensitivity(model, x, samples=2, radius=0.005)
    large = max_sensitivity(model, x, samples=2, radius=0.1)
    assert 0 <= small < large
    assert parameter_noise_rank_correlation(model, x, noise_std=0.0) == pytest.approx(1.0)
    assert parameter_noise_rank_correlation(model, x, noise_std=0.5) < 0.99


def test_inpaint_changes_only_masked_pixels_and_uses_surroundings() -> None:
    x = torch.full((1, 1, 16, 16), 0.3)
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., 6:9, 6:9] = 1
    marked = x * (1 - masks) + masks
    filled = inpaint(marked, masks)
    assert torch.equal(filled[masks == 0], marked[masks == 0])
    torch.testing.assert_close(filled[masks == 1], torch.full((9,), 0.3), atol=1e-4, rtol=0)


def test_counterfactual_shift_detects_a_model_trained_on_the_marker(disc_images) -> None:
    torch.manual_seed(0)
    backgrounds, _, _ = disc_images(240, 32, seed=5, contrast=0.0)
    masks = torch.zeros(240, 1, 32, 32)
    masks[..., 2:6, 2:12] = 1
    labels = torch.arange(240) % 2
    has_marker = (labels == 1).view(-1, 1, 1, 1)
    images = torch.where(has_marker & (masks > 0), torch.ones_like(backgrounds), backgrounds)
    model = create_model("bcos_cnn_small", 1, 2, width=8)
    train_sic(model, images[:200], labels[:200], TrainConfig(epochs=5, warmup_epochs=0.5))
    marked = images[200:][labels[200:] == 1]
    clean = images[200:][labels[200:] == 0]
    shift = marker_counterfactual_shift(model, marked, masks[: marked.shape[0]], clean)
    assert shift.pairs == 40
    assert shift.shift > 0.2
    assert shift.flip_share > 0.5
