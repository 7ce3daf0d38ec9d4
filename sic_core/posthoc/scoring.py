"""Every explanation method scored by the same :mod:`sic_core.metrics` on the same audit set.

:func:`score_method` returns ``{"posthoc/<method>/<metric>": value}`` for one method of
:data:`~sic_core.posthoc.methods.METHODS` and the model it explains (SIC for ``sic`` and
``sic_gradcam``, the black-box twin for the others). Per metric (``nan`` where it does not
apply, e.g. no true positive with a lesion mask):

- ``rma_lift``, ``pointing_game``: :func:`~sic_core.metrics.mass_lift` (median) and
  :func:`~sic_core.metrics.pointing_game` of the true class's map on true positives with a
  lesion mask;
- ``deletion_auc``, ``insertion_auc`` and their random-order gaps:
  :func:`~sic_core.metrics.deletion_insertion` of the predicted class's map, in the explained
  model's logit units (compare AUCs within one model; the gaps' signs across models);
- ``randomisation_rank_corr``: mean over the steps of the cascade (output side first, every
  layer, cumulative) of :func:`~sic_core.metrics.cascade_rank_correlations` (median Spearman
  of trained against randomised maps of the predicted class); a map that does not depend on
  the learned weights stays near 1;
- ``max_sensitivity``: :func:`~sic_core.metrics.max_sensitivity` with the method's maps;
- ``artifact_mass_lift``: median :func:`~sic_core.metrics.mass_lift` of the positive class's
  map on the marker of marked images;
- ``marker_counterfactual_shift``: :func:`~sic_core.metrics.marker_counterfactual_shift` of
  the explained model (a property of the model, the same for every method of one model);
- ``seconds_per_image``: wall time of the method's maps of the scored images, per image;
- ``completeness_max_rel_err``: SIC's exact sum (:func:`~sic_core.metrics.
  completeness_max_rel_err`) and integrated gradients' sum against ``f(x) - f(0)``; absent
  for methods that define no completeness.

The expensive methods (occlusion, LIME, SHAP, IBA) are scored on a fixed subset of the audit
set (:attr:`ScoringConfig.subset` cases, interleaved by class so it holds positives).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sic_core.explanations import explain
from sic_core.metrics import (
    cascade_rank_correlations,
    completeness_max_rel_err,
    deletion_insertion,
    marker_counterfactual_shift,
    mass_lift,
    max_sensitivity,
    parameter_layers,
    pointing_game,
)
from sic_core.model import SICModel
from sic_core.posthoc.methods import METHODS, integrated_gradients_completeness
from sic_core.wire_posthoc import PosthocMetric, posthoc_key

__all__ = ["AuditCases", "ScoringConfig", "fixed_subset", "score_method"]


@dataclass(frozen=True)
class AuditCases:
    """The images every method explains (tensors on the CPU).

    Attributes
    ----------
    images, labels
        ``(N, C, H, W)`` in ``[0, 1]`` and ``(N,)`` classes (0 normal, > 0 findings).
    lesion
        ``(N, H, W)`` bool lesion masks (all false where unknown).
    marked, marker
        ``(M, C, H, W)`` images carrying a burned-in marker and its ``(M, H, W)`` masks.
    clean
        ``(M', C, H, W)`` images without it (the marker is pasted onto them).
    """

    images: Tensor
    labels: Tensor
    lesion: Tensor
    marked: Tensor
    marker: Tensor
    clean: Tensor


@dataclass(frozen=True)
class ScoringConfig:
    """How much of the audit set each metric uses (the cost stays bounded)."""

    #: Cases scored by the expensive methods (all cases for the others).
    subset: int = 8
    #: Deletion/insertion steps and cases (the first of the scored ones).
    steps: int = 8
    curve_images: int = 8
    #: Cases and noise draws of max-sensitivity; its noise radius.
    sensitivity_images: int = 4
    sensitivity_samples: int = 2
    sensitivity_radius: float = 0.02
    #: Cases of the cascading randomisation.
    randomisation_images: int = 4
    #: Marked images for the artifact mass (at most).
    marked_images: int = 8
    positive_class: int = 1
    seed: int = 0


def fixed_subset(labels: Tensor, count: int) -> Tensor:
    """The first ``count`` indices taken round-robin over the classes (in order of index)."""
    members = [torch.nonzero(labels == c).flatten() for c in labels.unique().tolist()]
    chosen: list[int] = []
    position = 0
    while len(chosen) < min(count, labels.numel()):
        for indices in members:
            if position < indices.numel() and len(chosen) < count:
                chosen.append(int(indices[position]))
        position += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def _nanmedian(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if finite.numel() else math.nan


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(x).argmax(dim=1)
    finally:
        model.train(was_training)


def score_method(
    method: str,
    model: nn.Module,
    cases: AuditCases,
    *,
    fresh: nn.Module,
    refresh: Callable[[nn.Module], None] | None = None,
    reference: Tensor | None = None,
    config: ScoringConfig | None = None,
) -> dict[str, float]:
    """Every ``posthoc/<method>/<metric>`` of one method on ``cases``.

    Parameters
    ----------
    method
        A name of :data:`~sic_core.posthoc.methods.METHODS`.
    model
        The model the method explains (SIC or the twin), on the device to compute on.
    cases
        The audit set.
    fresh
        A newly initialised model of ``model``'s architecture (the cascade's random weights).
    refresh
        Called on each randomised copy (SIC: re-embed the support images).
    reference
        Reference images for IBA's feature statistics (default: the scored images).
    config
        Subset sizes and steps.
    """
    config = config or ScoringConfig()
    entry = METHODS[method]
    device = next(model.parameters()).device

    def maps_of(explained: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return entry(explained, x.to(device), target.to(device), reference=reference)

    scored = fixed_subset(cases.labels, config.subset) if entry.expensive else None
    images = cases.images if scored is None else cases.images[scored]
    labels = cases.labels if scored is None else cases.labels[scored]
    lesion = cases.lesion if scored is None else cases.lesion[scored]
    x = images.to(device)
    predicted = _predict(model, x).cpu()

    started = time.perf_counter()
    maps = maps_of(model, x, predicted)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started

    metric = PosthocMetric
    values: dict[str, float] = {metric.SECONDS_PER_IMAGE: seconds / max(1, images.shape[0])}
    true_positive = (labels > 0) & (predicted == labels) & lesion.flatten(1).any(1)
    values[metric.RMA_LIFT] = _nanmedian(mass_lift(maps[true_positive], lesion[true_positive]))
    values[metric.POINTING_GAME] = pointing_game(maps[true_positive], lesion[true_positive])[0]

    curve = slice(0, config.curve_images)
    curves = deletion_insertion(
        model,
        x[curve],
        maps[curve].to(device),
        predicted[curve].to(device),
        steps=config.steps,
        seed=config.seed,
    )
    values[metric.DELETION_AUC] = curves.deletion_auc
    values[metric.INSERTION_AUC] = curves.insertion_auc
    values[metric.DELETION_RANDOM_GAP] = curves.deletion_random_auc - curves.deletion_auc
    values[metric.INSERTION_RANDOM_GAP] = curves.insertion_auc - curves.insertion_random_auc

    few = x[: config.randomisation_images]
    cascade = cascade_rank_correlations(
        model,
        few,
        predicted[: config.randomisation_images].to(device),
        maps_of,
        fresh=fresh,
        layers=parameter_layers(model),
        refresh=refresh,
    )
    values[metric.RANDOMISATION_RANK_CORR] = float(
        torch.tensor([rho for layer, rho in cascade if layer != "none"]).mean()
    )
    values[metric.MAX_SENSITIVITY] = max_sensitivity(
        model,
        x[: config.sensitivity_images],
        samples=config.sensitivity_samples,
        radius=config.sensitivity_radius,
        seed=config.seed,
        explainer=maps_of,
    )

    marked = cases.marked[: config.marked_images]
    marker = cases.marker[: config.marked_images]
    if marked.shape[0]:
        positive = torch.full((marked.shape[0],), config.positive_class)
        marked_maps = maps_of(model, marked, positive)
        values[metric.ARTIFACT_MASS_LIFT] = _nanmedian(mass_lift(marked_maps, marker))
    else:
        values[metric.ARTIFACT_MASS_LIFT] = math.nan
    shift = marker_counterfactual_shift(
        model,
        marked.to(device),
        marker.unsqueeze(1).to(device),
        cases.clean[: config.marked_images].to(device),
        positive_class=config.positive_class,
    )
    values[metric.MARKER_COUNTERFACTUAL_SHIFT] = shift.shift

    if method == "sic" and isinstance(model, SICModel):
        values[metric.COMPLETENESS_MAX_REL_ERR] = completeness_max_rel_err(
            explain(model, x, target=predicted.to(device), per_support=False)
        )
    elif method == "integrated_gradients":
        values[metric.COMPLETENESS_MAX_REL_ERR] = integrated_gradients_completeness(
            model, x, predicted.to(device)
        )
    return {posthoc_key(method, key): float(value) for key, value in values.items()}
