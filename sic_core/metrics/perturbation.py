"""Explanation-quality metrics that perturb the image (or the model) and re-run it.

Every perturbation acts on the image ``x`` in ``[0, 1]``; the model re-encodes ``[x, 1 - x]``
itself. Curves are of the explained logit ``z_c``. Images may lie on the host while the model
is on a GPU: perturbations are built where the images are and each forward runs on the
model's device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sic_core.explanations import explain
from sic_core.metrics.maps import spearman
from sic_core.model import SICModel

__all__ = [
    "CounterfactualShift",
    "DeletionInsertion",
    "blur",
    "deletion_insertion",
    "inpaint",
    "marker_counterfactual_shift",
    "max_sensitivity",
    "parameter_noise_rank_correlation",
]

_FORWARD_CHUNK = 256


def blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` images with reflect padding."""
    radius = max(1, math.ceil(3 * sigma))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(grid**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(padded, horizontal, groups=channels), vertical, groups=channels)


def inpaint(x: Tensor, masks: Tensor, *, sigma: float | None = None) -> Tensor:
    """Fill masked pixels from their surroundings (normalised convolution).

    ``x_filled = blur(x (1 - M)) / blur(1 - M)`` inside ``M``; ``x`` elsewhere.

    Parameters
    ----------
    x
        ``(B, C, H, W)`` images in ``[0, 1]``.
    masks
        ``(B, 1, H, W)`` binary masks of the pixels to replace.
    """
    masks = masks.to(x.dtype)
    sigma = sigma if sigma is not None else max(1.0, x.shape[-1] / 32)
    keep = 1 - masks
    filled = blur(x * keep, sigma) / blur(keep.expand_as(x), sigma).clamp_min(1e-6)
    return (x * keep + filled.clamp(0, 1) * masks).clamp(0, 1)


@torch.no_grad()
def _target_logits(model: SICModel, x: Tensor, target: Tensor) -> Tensor:
    """The target logit of each image, computed on the model's device, returned on ``x``'s."""
    device = model.support_vectors.device
    logits = model(x.to(device)).gather(1, target.to(device).view(-1, 1)).squeeze(1)
    return logits.to(x.device)


@dataclass(frozen=True)
class DeletionInsertion:
    """Areas under the target-logit curves (mean over images, trapezoid over [0, 1]).

    ``*_random_auc`` use a random pixel order: a faithful map has deletion well below and
    insertion well above its random counterpart.
    """

    deletion_auc: float
    insertion_auc: float
    deletion_random_auc: float
    insertion_random_auc: float


def _curve_auc(
    model: SICModel,
    x: Tensor,
    baseline: Tensor,
    order: Tensor,
    target: Tensor,
    steps: int,
    *,
    insert: bool,
) -> float:
    batch, _, height, width = x.shape
    pixels = height * width
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels, device=x.device).expand(batch, -1))
    start, end = (baseline, x) if insert else (x, baseline)
    # All steps of all images in a few large forwards: far cheaper than one per step.
    fractions = torch.tensor([round(step * pixels / steps) for step in range(steps + 1)])
    changed = ranks.view(batch, 1, 1, height, width) < fractions.view(1, -1, 1, 1, 1).to(x.device)
    perturbed = torch.where(changed, end.unsqueeze(1), start.unsqueeze(1)).flatten(0, 1)
    repeated_target = target.repeat_interleave(steps + 1)
    values = torch.cat(
        [
            _target_logits(model, chunk, chunk_target)
            for chunk, chunk_target in zip(
                perturbed.split(_FORWARD_CHUNK), repeated_target.split(_FORWARD_CHUNK), strict=True
            )
        ]
    ).view(batch, steps + 1)
    return float(torch.trapezoid(values, dx=1 / steps, dim=1).mean())


def deletion_insertion(
    model: SICModel,
    x: Tensor,
    maps: Tensor,
    target: Tensor,
    *,
    steps: int = 20,
    baseline: str = "blur",
    seed: int = 0,
) -> DeletionInsertion:
    """Deletion and insertion AUCs of the target logit, pixels ordered by ``R^c`` (descending).

    Deletion replaces the most relevant pixels of ``x`` by the baseline in ``steps`` equal
    steps; insertion starts from the baseline and restores them. Baseline ``"blur"`` is a
    Gaussian blur of ``x`` (sigma = W/8), ``"mean"`` the image's mean intensity.
    """
    if baseline == "blur":
        reference = blur(x, max(1.0, x.shape[-1] / 8)).clamp(0, 1)
    elif baseline == "mean":
        reference = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    else:
        raise ValueError(f"baseline: expected 'blur' or 'mean', got {baseline!r}")
    order = maps.flatten(1).to(x.device).argsort(dim=1, descending=True)
    generator = torch.Generator().manual_seed(seed)
    random_order = torch.stack(
        [torch.randperm(order.shape[1], generator=generator) for _ in range(order.shape[0])]
    ).to(order.device)
    model.eval()
    return DeletionInsertion(
        deletion_auc=_curve_auc(model, x, reference, order, target, steps, insert=False),
        insertion_auc=_curve_auc(model, x, reference, order, target, steps, insert=True),
        deletion_random_auc=_curve_auc(
            model, x, reference, random_order, target, steps, insert=False
        ),
        insertion_random_auc=_curve_auc(
            model, x, reference, random_order, target, steps, insert=True
        ),
    )


def max_sensitivity(
    model: SICModel, x: Tensor, *, samples: int = 4, radius: float = 0.02, seed: int = 0
) -> float:
    """Mean over images of ``max_delta ||R(x + delta) - R(x)|| / ||R(x)||``.

    ``delta`` is uniform in ``[-radius, radius]`` per pixel (result clipped to [0, 1]); only
    perturbations that keep the prediction count. ``R`` is the predicted class's map.
    """
    reference = explain(model, x, per_support=False)
    base_maps = reference.target_maps()
    generator = torch.Generator().manual_seed(seed)
    worst = torch.zeros(x.shape[0])
    for _ in range(samples):
        delta = (torch.rand(x.shape, generator=generator) * 2 - 1) * radius
        perturbed = explain(
            model, (x + delta.to(x.device)).clamp(0, 1), target=reference.target, per_support=False
        )
        change = (perturbed.target_maps() - base_maps).flatten(1).norm(dim=1)
        ratio = change / base_maps.flatten(1).norm(dim=1).clamp_min(1e-12)
        same = perturbed.predicted == reference.predicted
        worst = torch.where(same, torch.maximum(worst, ratio), worst)
    return float(worst.mean())


def parameter_noise_rank_correlation(
    model: SICModel, x: Tensor, *, noise_std: float, seed: int = 0
) -> float:
    """Median Spearman correlation of predicted-class maps before and after parameter noise.

    Every trainable parameter gets i.i.d. Gaussian noise of standard deviation
    ``noise_std`` (e.g. the DP mechanism's per-step noise scale); support vectors are kept.
    """
    reference = explain(model, x, per_support=False)
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * noise_std
            parameter.add_(noise.to(parameter.device))
    perturbed = explain(noisy, x, target=reference.target, per_support=False)
    return float(spearman(reference.target_maps(), perturbed.target_maps()).median())


@dataclass(frozen=True)
class CounterfactualShift:
    """Effect of a burned-in artifact on the positive-class probability ``sigmoid(z_pos)``.

    Attributes
    ----------
    shift
        Mean of ``p(with artifact) - p(without)`` over every pair: marked images against
        their inpainted copies, and clean images with the artifact pasted against themselves.
    flip_share
        Share of those pairs whose predicted class differs.
    pairs
        Number of pairs.
    """

    shift: float
    flip_share: float
    pairs: int


@torch.no_grad()
def marker_counterfactual_shift(
    model: SICModel,
    marked: Tensor,
    marker_masks: Tensor,
    clean: Tensor,
    *,
    positive_class: int = 1,
    probabilities: Callable[[Tensor], Tensor] | None = None,
) -> CounterfactualShift:
    """Counterfactual shortcut test: remove the artifact from marked images, paste it on clean ones.

    Parameters
    ----------
    marked
        ``(B, C, H, W)`` images that carry the artifact.
    marker_masks
        ``(B, 1, H, W)`` its masks.
    clean
        ``(B', C, H, W)`` images without it; each gets the artifact pixels of
        ``marked[i % B]`` pasted in place.
    probabilities
        Logits ``(N, C)`` to class probabilities (e.g. the calibrated ones of
        :func:`sic_core.calibration.calibrated_probabilities`); default ``sigmoid``.
    """
    model.eval()
    with_marker = [marked]
    without_marker = [inpaint(marked, marker_masks)]
    if clean.shape[0] and marked.shape[0]:
        source = torch.arange(clean.shape[0]) % marked.shape[0]
        masks = marker_masks[source].to(clean.dtype)
        with_marker.append(clean * (1 - masks) + marked[source] * masks)
        without_marker.append(clean)
    device = model.support_vectors.device
    present = model(torch.cat(with_marker).to(device)).cpu()
    absent = model(torch.cat(without_marker).to(device)).cpu()
    if present.shape[0] == 0:
        return CounterfactualShift(shift=math.nan, flip_share=math.nan, pairs=0)
    to_probability = torch.sigmoid if probabilities is None else probabilities
    shift = (
        to_probability(present)[:, positive_class] - to_probability(absent)[:, positive_class]
    ).float()
    flips = present.argmax(dim=1) != absent.argmax(dim=1)
    return CounterfactualShift(
        shift=float(shift.mean()), flip_share=float(flips.float().mean()), pairs=int(shift.numel())
    )
