"""Calibration: Platt scaling of the logit margin, fitted from binned counts."""

from __future__ import annotations

import math

import pytest
import torch

from sic_core import create_model
from sic_core.calibration import (
    MARGIN_EDGES,
    Calibration,
    MarginHistogram,
    calibrated_probabilities,
    fit_calibration,
    logit_margins,
    margin_histogram,
    merge_histograms,
    raw_probabilities,
)
from sic_core.metrics import auroc, expected_calibration_error, inpaint, marker_counterfactual_shift


def _miscalibrated(n: int, *, slope: float, offset: float, seed: int):
    """Binary logits whose true P(y = 1) is ``sigmoid(slope * (z1 - z0) + offset)``."""
    generator = torch.Generator().manual_seed(seed)
    margin = 1.5 * torch.randn(n, generator=generator, dtype=torch.float64)
    labels = (
        torch.rand(n, generator=generator, dtype=torch.float64)
        < torch.sigmoid(slope * margin + offset)
    ).long()
    base = -math.log(2) + torch.rand(n, generator=generator, dtype=torch.float64)
    logits = torch.stack([base, base + margin], dim=1)
    return logits, labels


def test_margins_are_one_vs_rest() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, -1.0, 3.0]])
    expected = torch.tensor([[-2.0, 1.0, -1.0], [0.0, -4.0, 0.0]], dtype=torch.float64)
    assert torch.equal(logit_margins(logits), expected)


def test_fit_recovers_the_true_platt_parameters_and_lowers_ece() -> None:
    logits, labels = _miscalibrated(4000, slope=3.0, offset=-0.5, seed=0)
    calibration = fit_calibration(margin_histogram(logits, labels), intercept=True)
    assert calibration.slopes[1] == pytest.approx(3.0, rel=0.15)
    assert calibration.intercepts[1] == pytest.approx(-0.5, abs=0.15)
    raw = expected_calibration_error(raw_probabilities(logits), labels)
    calibrated = expected_calibration_error(calibrated_probabilities(logits, calibration), labels)
    assert raw > 0.1
    assert calibrated < 0.03


def test_binary_probability_is_platt_of_the_margin_and_sums_to_one() -> None:
    logits, labels = _miscalibrated(500, slope=2.0, offset=0.3, seed=1)
    calibration = fit_calibration(margin_histogram(logits, labels), intercept=True)
    probabilities = calibrated_probabilities(logits, calibration)
    margin = (logits[:, 1] - logits[:, 0]).double()
    expected = torch.sigmoid(calibration.slopes[1] * margin + calibration.intercepts[1])
    assert torch.allclose(probabilities[:, 1], expected, atol=1e-12)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(500, dtype=torch.float64))


def test_calibration_is_monotone_so_auroc_is_unchanged() -> None:
    logits, labels = _miscalibrated(600, slope=0.7, offset=1.0, seed=2)
    calibration = fit_calibration(margin_histogram(logits, labels), intercept=True)
    probabilities = calibrated_probabilities(logits, calibration)
    assert auroc(probabilities, labels) == auroc(logits, labels)
    order_raw = (logits[:, 1] - logits[:, 0]).argsort()
    assert bool((probabilities[order_raw, 1].diff() >= 0).all())


def test_fit_does_not_depend_on_the_order_of_sites_or_cases() -> None:
    sites = [_miscalibrated(n, slope=2.0, offset=-0.2, seed=s) for s, n in enumerate((90, 40, 150))]
    merged = merge_histograms(margin_histogram(z, y) for z, y in sites)
    forward = fit_calibration(merged, intercept=True)
    shuffled = []
    for i, (z, y) in enumerate(reversed(sites)):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(i))
        shuffled.append(margin_histogram(z[order], y[order]))
    backward = fit_calibration(merge_histograms(shuffled), intercept=True)
    assert backward == forward
    assert fit_calibration(merge_histograms(shuffled)) == fit_calibration(merged)


def test_a_site_sends_binned_counts_only() -> None:
    logits, labels = _miscalibrated(200, slope=2.0, offset=0.0, seed=3)
    sent = margin_histogram(logits, labels)
    # The statistic's size does not grow with the cases, and it is integer counts.
    assert sent.counts.shape == margin_histogram(logits[:20], labels[:20]).counts.shape
    assert sent.counts.dtype == torch.int64
    assert sent.cases == 200
    # Moving one case's margin within its bin changes nothing that is sent: no per-case
    # value can be read back from it.
    margin = logits[0, 1] - logits[0, 0]
    bin_index = int(torch.bucketize(margin.double(), MARGIN_EDGES[1:-1], right=True))
    low, high = MARGIN_EDGES[bin_index], MARGIN_EDGES[bin_index + 1]
    moved = logits.clone()
    moved[0, 1] = moved[0, 0] + (0.9 * low + 0.1 * high if bin_index else high - 0.01)
    assert torch.equal(margin_histogram(moved, labels).counts, sent.counts)


def test_separated_cases_give_a_finite_increasing_calibration() -> None:
    logits = torch.tensor([[0.0, float(m)] for m in (-3, -2, -1.5, 1.5, 2, 3)])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    calibration = fit_calibration(margin_histogram(logits, labels))
    assert all(math.isfinite(a) and a > 0 for a in calibration.slopes)
    top = calibrated_probabilities(logits, calibration)[-1, 1]
    assert 0.5 < float(top) < 1.0


def test_default_fit_is_a_slope_without_intercept() -> None:
    logits, labels = _miscalibrated(800, slope=2.5, offset=0.0, seed=4)
    calibration = fit_calibration(margin_histogram(logits, labels))
    assert calibration.intercepts == (0.0, 0.0)
    assert calibration.slopes[1] == pytest.approx(2.5, rel=0.2)


def test_round_trip_and_bad_input() -> None:
    calibration = Calibration(slopes=(2.0, 2.0), intercepts=(-0.1, 0.1), cases=7)
    assert Calibration.from_dict(calibration.to_dict()) == calibration
    with pytest.raises(ValueError, match="method"):
        Calibration.from_dict({"method": "isotonic"})
    with pytest.raises(ValueError, match="slopes"):
        Calibration(slopes=(0.0, 1.0), intercepts=(0.0, 0.0))
    with pytest.raises(ValueError, match="counts"):
        MarginHistogram(torch.zeros(2, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="classes"):
        calibrated_probabilities(torch.zeros(3, 3), calibration)


def test_the_counterfactual_marker_shift_reads_calibrated_probabilities(disc_images) -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, n_shot=1, proj_dim=8)
    model.set_support(torch.rand(2, 8) + 0.1, torch.tensor([0, 1]))
    images, _, _ = disc_images(6, 24, seed=0)
    masks = torch.zeros(3, 1, 24, 24)
    masks[:, :, 1:4, 1:10] = 1
    marked = images[:3].clone()
    marked[masks.expand_as(marked) > 0] = 1.0
    calibration = Calibration(slopes=(4.0, 4.0), intercepts=(0.0, 0.0))
    raw = marker_counterfactual_shift(model, marked, masks, images[3:])
    calibrated = marker_counterfactual_shift(
        model,
        marked,
        masks,
        images[3:],
        probabilities=lambda z: calibrated_probabilities(z, calibration),
    )
    with torch.no_grad():
        present = model(torch.cat([marked, images[3:] * (1 - masks) + marked * masks]))
        absent = model(torch.cat([inpaint(marked, masks), images[3:]]))
    expected = (
        calibrated_probabilities(present, calibration)[:, 1]
        - calibrated_probabilities(absent, calibration)[:, 1]
    ).mean()
    assert calibrated.shift == pytest.approx(float(expected), abs=1e-6)
    assert calibrated.flip_share == raw.flip_share
