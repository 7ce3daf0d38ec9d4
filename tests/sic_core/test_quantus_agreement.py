"""Our explanation metrics against Quantus (a library no one here wrote) on the same maps.

Quantus is a test dependency only; the production metrics stay batched PyTorch. Each test
computes both on identical inputs and either asserts agreement or pins down the exact
definitional difference (and then asserts agreement once that difference is removed):

- pointing game: ours dilates the mask by ``tolerance`` pixels (3 by default; 0 is
  Quantus' definition) and takes the first argmax; Quantus counts a hit if *any* pixel tied
  at the maximum lies in the mask.
- relevance mass: ours is a *lift*, ``RMA / (|M| / HW)``, over ``R+ = max(R, 0)``; Quantus'
  relevance-mass accuracy is ``sum_M R / sum R`` over the signed map.
- max-sensitivity: ours ignores perturbations that change the prediction (Quantus, with
  ``return_nan_when_prediction_changes``, makes the whole image NaN instead) and averages
  over images (Quantus returns one value per image); draws are uniform in
  ``[-radius, radius]`` and clipped to ``[0, 1]`` (Quantus' ``uniform_noise`` does not clip).
- region perturbation (Samek et al.) with 1-pixel regions is our deletion curve:
  Quantus records ``f(x) - f(x_j)`` after each region, ours integrates ``f(x_j)`` over the
  removed fraction, with ``f(x_0) = f(x)`` at 0 (trapezoid); the baseline of our ``"mean"``
  is each image's mean, Quantus' a constant (images here have mean 0.5 exactly).
- sparseness: both are the Gini index of ``|R|``; Quantus adds 1e-7 to every value first.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from sic_core.metrics import deletion_insertion, gini, mass_lift, max_sensitivity, pointing_game
from sic_core.posthoc import PlainCNN, explain_method

if os.environ.get("CI") == "true":
    import quantus  # CI installs the dev dependencies: a missing Quantus is a failure there
else:
    quantus = pytest.importorskip("quantus", reason="quantus is a dev dependency (.[dev])")

pytestmark = pytest.mark.filterwarnings("ignore")


def _maps_and_masks(seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(12, 16, 16, generator=generator)
    masks = torch.zeros(12, 16, 16, dtype=torch.bool)
    for i in range(12):
        top, left = torch.randint(0, 10, (2,), generator=generator).tolist()
        masks[i, top : top + 6, left : left + 6] = True
    # Plant the maximum inside the mask for half of the maps, so both outcomes occur.
    for i in range(0, 12, 2):
        inside = torch.nonzero(masks[i])[0]
        maps[i, inside[0], inside[1]] = maps[i].max() + 1
    return maps, masks


def _batches(maps: Tensor, masks: Tensor) -> dict[str, np.ndarray]:
    return {
        "x_batch": torch.rand(maps.shape[0], 1, *maps.shape[1:]).numpy(),
        "y_batch": np.zeros(maps.shape[0], dtype=np.int64),
        "a_batch": maps.unsqueeze(1).numpy().copy(),
        "s_batch": masks.unsqueeze(1).float().numpy(),
    }


def test_pointing_game_agrees_at_zero_tolerance() -> None:
    maps, masks = _maps_and_masks()
    theirs = quantus.PointingGame(disable_warnings=True)(model=None, **_batches(maps, masks))
    hit_rate, _ = pointing_game(maps, masks, tolerance=0)
    assert hit_rate == pytest.approx(float(np.mean(theirs)))
    assert 0 < hit_rate < 1
    # Our default tolerance (3 px) counts near misses too: a documented difference.
    assert pointing_game(maps, masks)[0] >= hit_rate


def test_relevance_mass_accuracy_is_our_lift_times_the_mask_share_on_positive_maps() -> None:
    maps, masks = _maps_and_masks()
    area = masks.float().mean(dim=(1, 2))
    positive = maps.clamp_min(0)
    theirs = quantus.RelevanceMassAccuracy(disable_warnings=True, normalise=False)(
        model=None, **_batches(positive, masks)
    )
    ours = mass_lift(maps, masks) * area
    np.testing.assert_allclose(ours.numpy(), np.asarray(theirs), rtol=1e-5)
    # On the signed map Quantus keeps negative relevance, we do not: they differ.
    signed = quantus.RelevanceMassAccuracy(disable_warnings=True, normalise=False)(
        model=None, **_batches(maps, masks)
    )
    assert not np.allclose(ours.numpy(), np.asarray(signed), rtol=1e-3)


def test_sparseness_is_our_gini_index() -> None:
    maps, masks = _maps_and_masks()
    theirs = quantus.Sparseness(disable_warnings=True, normalise=False, abs=True)(
        model=None, **_batches(maps, masks)
    )
    np.testing.assert_allclose(gini(maps).numpy(), np.asarray(theirs), rtol=1e-5, atol=1e-6)


def _saliency_for_quantus(
    model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_
) -> np.ndarray:
    maps = explain_method(
        "saliency", model, torch.as_tensor(inputs), torch.as_tensor(targets).long()
    )
    return maps.unsqueeze(1).numpy()


def test_max_sensitivity_agrees_with_the_same_noise_draws() -> None:
    torch.manual_seed(0)
    model = PlainCNN(width=8).eval()
    x = torch.rand(6, 1, 16, 16)
    radius, samples = 0.02, 3
    with torch.no_grad():
        predicted = model(x).argmax(1)
    generator = torch.Generator().manual_seed(0)

    def same_draws(arr: np.ndarray, **_) -> np.ndarray:
        # Our draws, in our order: one uniform tensor of the batch's shape per sample.
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * radius
        return (torch.as_tensor(arr).view_as(x) + delta).clamp(0, 1).reshape(arr.shape).numpy()

    theirs = quantus.MaxSensitivity(
        nr_samples=samples,
        perturb_func=same_draws,
        normalise=False,
        abs=False,
        disable_warnings=True,
        return_nan_when_prediction_changes=True,
    )(
        model=model,
        x_batch=x.numpy(),
        y_batch=predicted.numpy(),
        a_batch=None,
        explain_func=_saliency_for_quantus,
        softmax=False,
        device="cpu",
    )
    assert np.isfinite(theirs).all()  # no prediction changed, so the definitions coincide

    def saliency(explained: nn.Module, images: Tensor, target: Tensor) -> Tensor:
        return explain_method("saliency", explained, images, target)

    ours = max_sensitivity(model, x, samples=samples, radius=radius, seed=0, explainer=saliency)
    assert ours > 0
    assert ours == pytest.approx(float(np.mean(theirs)), rel=1e-4)


def test_region_perturbation_with_one_pixel_regions_is_our_deletion_curve() -> None:
    torch.manual_seed(0)
    model = PlainCNN(width=8).eval()
    half = torch.rand(4, 1, 12, 6)
    x = torch.cat([half, 1 - half], dim=3)  # every image's mean is exactly 0.5
    pixels = x.shape[-1] * x.shape[-2]
    maps = torch.randn(4, 12, 12)
    target = torch.tensor([0, 1, 0, 1])
    curves = quantus.RegionPerturbation(
        patch_size=1,
        regions_evaluation=pixels,
        order="morf",
        perturb_baseline=0.5,
        normalise=False,
        abs=False,
        disable_warnings=True,
    )(
        model=model,
        x_batch=x.numpy(),
        y_batch=target.numpy(),
        a_batch=maps.unsqueeze(1).numpy(),
        softmax=False,
        device="cpu",
    )
    with torch.no_grad():
        start = model(x)[torch.arange(4), target].numpy()
    logits = start[:, None] - np.asarray(curves)  # f(x_j) for j = 1..HW
    full = np.concatenate([start[:, None], logits], axis=1)
    expected = float(np.trapezoid(full, dx=1 / pixels, axis=1).mean())
    ours = deletion_insertion(model, x, maps, target, steps=pixels, baseline="mean")
    assert ours.deletion_auc == pytest.approx(expected, rel=1e-4, abs=1e-5)
