"""Explanation quality at a site, per round, on a fixed and versioned audit set.

The audit set is drawn once from the site's validation split (stratified by class,
deterministic for the site's seed) and keeps its version as long as the split does, so the
same cases are explained every round. Every metric is one of :mod:`sic_core.metrics`; this
module only chooses images, masks and targets, and names the results with the MLflow keys of
METRICS.md. Nothing here leaves the site but the returned numbers.

Conventions
-----------
- Class 0 is the normal class; every other class is a finding ("positive"). Localisation
  uses true positives with a lesion mask and their true class's map; shortcut mass uses the
  first positive class's map on images with a marker mask.
- A metric that does not apply at a site (no lesion masks; no earlier round for stability)
  is ``nan``; the server logs only finite values. Shortcut metrics always apply: a site
  without marked images measures them on audit cases with the public marker burned in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from client.synth.render import public_marker_mask
from sic_core import Explanation, SICModel, explain
from sic_core.calibration import Calibration, calibrated_probabilities
from sic_core.metrics import (
    Interval,
    bootstrap_interval,
    completeness_max_rel_err,
    deletion_insertion,
    evidence_concentration,
    gini,
    marker_counterfactual_shift,
    mass_lift,
    max_sensitivity,
    parameter_noise_rank_correlation,
    pointing_game,
    spearman,
    support_jaccard,
    top_support_agreement,
)
from sic_core.why_similar import PROPERTIES, WhySimilar, support_profiles, why_similar
from sic_core.wire import WhyMetric, XaiMetric, support_jaccard_key

__all__ = [
    "AuditSet",
    "AuditWhy",
    "ExplanationState",
    "audit_intervals",
    "audit_metrics",
    "audit_why_similar",
    "select_audit_set",
]

POSITIVE_CLASS = 1
#: Supports per case whose "why similar" enters ``why/*`` (the gallery shows as many).
TOP_SUPPORTS = 3
#: Audit cases (the first ones) measured against every support for "why similar": its
#: position property costs four forwards and two backwards per pair, so all 64 audit cases
#: against six supports would take twenty times an explanation of the audit set.
WHY_PROFILE_CASES = 16


@dataclass(frozen=True)
class AuditSet:
    """The fixed cases a site explains every round.

    Attributes
    ----------
    images, labels
        ``(N, C, S, S)`` float32 in [0, 1] and ``(N,)`` int64.
    lesion, marker
        ``(N, S, S)`` bool masks (all false where unknown).
    indices
        Positions of the cases in the validation split.
    version
        Hash of the selection (changes when the split or the size changes).
    """

    images: Tensor
    labels: Tensor
    lesion: Tensor
    marker: Tensor
    indices: Tensor
    version: str


def select_audit_set(
    images: Tensor, labels: Tensor, masks: dict[str, Tensor], *, size: int, seed: int
) -> AuditSet:
    """Draw up to ``size`` cases, as equal per class as the split allows, deterministically."""
    generator = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    shuffled = [
        members[torch.randperm(members.numel(), generator=generator)] for members in per_class
    ]
    chosen: list[int] = []
    round_robin = 0
    while len(chosen) < min(size, labels.numel()):
        for members in shuffled:
            if round_robin < members.numel() and len(chosen) < size:
                chosen.append(int(members[round_robin]))
        round_robin += 1
    indices = torch.tensor(sorted(chosen), dtype=torch.long)
    empty = torch.zeros(labels.numel(), *images.shape[2:], dtype=torch.bool)

    def mask(name: str) -> Tensor:
        return masks[name][:, 0].bool() if name in masks else empty

    digest = hashlib.sha256()
    digest.update(indices.numpy().tobytes())
    digest.update(images[indices].numpy().tobytes())
    return AuditSet(
        images=images[indices],
        labels=labels[indices],
        lesion=mask("lesion")[indices],
        marker=mask("marker")[indices],
        indices=indices,
        version=f"audit-{digest.hexdigest()[:12]}",
    )


@dataclass(frozen=True)
class ExplanationState:
    """What a site remembers between rounds to measure support stability."""

    support_ids: list[int]
    top_support_ids: list[int]


def _nanmedian(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if finite.numel() else math.nan


def _pasted_markers(audit: AuditSet, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """Audit images with the public marker burned in, their masks, and clean images.

    The first ``count`` audit cases get the marker (pixels set to white, as SynthCXR burns
    it in); the next ``count`` stay clean for the counterfactual paste test.
    """
    size = audit.images.shape[-1]
    mask = torch.from_numpy(public_marker_mask(size))
    originals = audit.images[:count]
    marked = originals.clone()
    marked[:, :, mask] = 1.0
    masks = mask.expand(originals.shape[0], size, size)
    return marked, masks, audit.images[count : 2 * count]


def audit_metrics(
    model: SICModel,
    audit: AuditSet,
    *,
    support_ids: Tensor,
    previous: ExplanationState | None,
    global_model: SICModel | None = None,
    probe: Tensor | None = None,
    parameter_noise_std: float = 0.01,
    steps: int = 8,
    curve_images: int = 8,
    pasted_images: int = 8,
    explanation: Explanation | None = None,
    seed: int = 0,
    calibration: Calibration | None = None,
) -> tuple[dict[str, float], ExplanationState]:
    """Every per-round explanation-quality metric of METRICS.md on the audit set.

    Parameters
    ----------
    model
        The global model with the site-local support set (nearest local training images).
    audit
        The site's audit set.
    support_ids
        ``(K,)`` training-split index of each local support (stable image ids at this site).
    previous
        Last round's state (``None`` in the first round: stability metrics are ``nan``).
    global_model, probe
        The same weights with the *global* support vectors, and public probe images: drift
        is ``1 - median Spearman`` of their positive-evidence maps against the local model's.
    parameter_noise_std
        Standard deviation of the parameter noise for ``xai/dp_noise_rank_corr`` (the DP
        mechanism's per-step scale at DP sites).
    steps, curve_images
        Deletion/insertion steps, and how many audit cases (the first ones) get curves:
        ``4 * curve_images * (steps + 1)`` forwards, the largest cost of the audit. METRICS.md
        asks for 20-32 steps; 8 keep the curves' shape at 64 px and the evaluation within
        its share of the round (see BENCHMARKS.md).
    pasted_images
        At a site whose audit set has no marked image, shortcut mass and the counterfactual
        shift are measured on this many audit cases with the public marker burned in
        (:func:`client.synth.render.public_marker_mask`), so that every site reports them
        and the shortcut site stands out by its model, not by its data alone.
    explanation
        ``explain(model, audit.images)`` if the caller has it already (the report reuses it).
    calibration
        The round's calibration: the counterfactual shift is a change of the calibrated
        probability (of the sigmoid of the logit without one).
    """
    result = (
        explanation if explanation is not None else explain(model, audit.images, per_support=False)
    )
    predicted = result.predicted
    maps = result.target_maps()
    metrics: dict[str, float] = {
        XaiMetric.COMPLETENESS: completeness_max_rel_err(result),
        XaiMetric.EVIDENCE_CONCENTRATION: evidence_concentration(result.evidence),
        XaiMetric.GINI: float(gini(maps).mean()),
    }

    top_ids = support_ids[result.evidence.argmax(dim=1)].tolist()
    labels_k = model.support_labels.cpu()
    if previous is None:
        jaccard = [math.nan] * model.num_classes
        agreement = math.nan
    else:
        jaccard = support_jaccard(
            torch.tensor(previous.support_ids), support_ids.cpu(), labels_k, model.num_classes
        )
        agreement = top_support_agreement(
            torch.tensor(previous.top_support_ids), torch.tensor(top_ids)
        )
    for c, value in enumerate(jaccard):
        metrics[support_jaccard_key(c)] = value
    metrics[XaiMetric.TOP_SUPPORT_AGREEMENT] = agreement

    true_positive = (
        (audit.labels > 0) & (predicted == audit.labels) & audit.lesion.flatten(1).any(1)
    )
    truth_maps = result.class_maps[torch.arange(audit.labels.numel()), audit.labels]
    metrics[XaiMetric.RMA_LIFT] = _nanmedian(
        mass_lift(truth_maps[true_positive], audit.lesion[true_positive])
    )
    hit, baseline = pointing_game(truth_maps[true_positive], audit.lesion[true_positive])
    metrics[XaiMetric.POINTING_GAME] = hit
    metrics[XaiMetric.POINTING_GAME_BASELINE] = baseline

    marked = audit.marker.flatten(1).any(1)
    if marked.any():
        marked_images, marker_masks = audit.images[marked], audit.marker[marked]
        marked_maps = result.class_maps[marked, POSITIVE_CLASS]
        clean_images = audit.images[~marked]
    else:
        marked_images, marker_masks, clean_images = _pasted_markers(audit, pasted_images)
        marked_maps = explain(model, marked_images, per_support=False).class_maps[:, POSITIVE_CLASS]
    metrics[XaiMetric.ARTIFACT_MASS_LIFT] = _nanmedian(mass_lift(marked_maps, marker_masks))
    shift = marker_counterfactual_shift(
        model,
        marked_images,
        marker_masks.unsqueeze(1),
        clean_images,
        positive_class=POSITIVE_CLASS,
        probabilities=(
            None
            if calibration is None
            else lambda logits: calibrated_probabilities(logits, calibration)
        ),
    )
    metrics[XaiMetric.MARKER_COUNTERFACTUAL_SHIFT] = shift.shift
    metrics[XaiMetric.MARKER_COUNTERFACTUAL_FLIPS] = shift.flip_share

    # Curves cost (steps + 1) forwards per image and curve: a fixed subset keeps them cheap.
    subset = slice(0, curve_images)
    curves = deletion_insertion(
        model, audit.images[subset], maps[subset], predicted[subset], steps=steps, seed=seed
    )
    metrics[XaiMetric.DELETION_AUC] = curves.deletion_auc
    metrics[XaiMetric.INSERTION_AUC] = curves.insertion_auc
    metrics[XaiMetric.DELETION_RANDOM_GAP] = curves.deletion_random_auc - curves.deletion_auc
    metrics[XaiMetric.INSERTION_RANDOM_GAP] = curves.insertion_auc - curves.insertion_random_auc

    few = audit.images[:8]
    metrics[XaiMetric.MAX_SENSITIVITY] = max_sensitivity(model, few, samples=2, seed=seed)
    metrics[XaiMetric.DP_NOISE_RANK_CORR] = parameter_noise_rank_correlation(
        model, few, noise_std=parameter_noise_std, seed=seed
    )

    if global_model is not None and probe is not None and probe.shape[0]:
        local = explain(model, probe, per_support=False).class_maps[:, POSITIVE_CLASS]
        shared = explain(global_model, probe, per_support=False).class_maps[:, POSITIVE_CLASS]
        drift = spearman(local.clamp_min(0), shared.clamp_min(0)).median()
        metrics[XaiMetric.DRIFT_TO_GLOBAL] = 1 - float(drift)
    else:
        metrics[XaiMetric.DRIFT_TO_GLOBAL] = math.nan
    state = ExplanationState(support_ids=support_ids.tolist(), top_support_ids=top_ids)
    return {str(key): float(value) for key, value in metrics.items()}, state


@dataclass(frozen=True)
class AuditWhy:
    """'Why similar' of audit cases against the site-local supports.

    Attributes
    ----------
    pairs
        ``(P, 2)`` (audit case, support index) of each pair: the first
        :data:`WHY_PROFILE_CASES` audit cases against every support, plus any further cases
        asked for against their top supports.
    influence
        ``(P, 5)`` signed, normalised influence per property (:data:`PROPERTIES` order).
    profiles
        ``(K, 5)`` each support's mean influence over the profile cases (its global version;
        ``nan`` for a support without a local image).
    top
        ``(P,)`` bool: a profile case's pair with one of its :data:`TOP_SUPPORTS` strongest
        supports of its predicted class (the pairs ``why/*`` averages).
    """

    pairs: Tensor
    influence: Tensor
    profiles: Tensor
    top: Tensor

    def of(self, case: int, support: int) -> dict[str, float] | None:
        """``{property: influence}`` of one pair (``None`` if it was not measured)."""
        match = (self.pairs[:, 0] == case) & (self.pairs[:, 1] == support)
        if not match.any():
            return None
        row = self.influence[torch.nonzero(match).flatten()[0]]
        return {p: float(v) for p, v in zip(PROPERTIES, row, strict=True)}

    def metrics(self) -> dict[str, float]:
        """``why/<property>``: mean influence over the top pairs (``nan`` if there are none)."""
        chosen = self.influence[self.top]
        return {
            str(key): float(chosen[:, i].mean()) if chosen.shape[0] else math.nan
            for i, key in enumerate(WhyMetric)
        }


def audit_why_similar(
    model: SICModel,
    audit: AuditSet,
    explanation: Explanation,
    support_images: Tensor,
    present: Tensor,
    *,
    extra_cases: Sequence[int] = (),
) -> AuditWhy:
    """Property influences (:func:`sic_core.why_similar.why_similar`) on the audit set.

    Parameters
    ----------
    model
        The evaluated model with the site-local supports.
    audit, explanation
        The audit set and ``explain(model, audit.images)`` (for each case's top supports).
    support_images
        ``(K, C, S, S)`` the training image behind each support.
    present
        ``(K,)`` bool: the support has a local image (absent classes keep a global vector).
    extra_cases
        Further audit cases (e.g. the gallery's) to measure against their top supports.
    """
    profile_cases = list(range(min(WHY_PROFILE_CASES, audit.labels.numel())))
    supports = torch.nonzero(present).flatten().tolist()
    labels_k = model.support_labels.cpu()

    def strongest(case: int) -> list[int]:
        predicted = int(explanation.predicted[case])
        in_class = [k for k in supports if int(labels_k[k]) == predicted]
        return sorted(in_class, key=lambda k: -float(explanation.evidence[case, k]))[:TOP_SUPPORTS]

    rows = [(i, k, k in strongest(i)) for i in profile_cases for k in supports]
    rows += [(i, k, False) for i in extra_cases if i not in profile_cases for k in strongest(i)]
    pairs = torch.tensor([(i, k) for i, k, _ in rows], dtype=torch.long).view(-1, 2)
    top = torch.tensor([is_top for _, _, is_top in rows], dtype=torch.bool)
    if pairs.shape[0] == 0:
        empty = torch.zeros(0, len(PROPERTIES))
        profiles = torch.full((labels_k.numel(), len(PROPERTIES)), math.nan)
        return AuditWhy(pairs=pairs, influence=empty, profiles=profiles, top=top)
    result = why_similar(model, audit.images, support_images, pairs)
    in_profile = pairs[:, 0] < len(profile_cases)
    profiles = support_profiles(
        WhySimilar(
            similarity=result.similarity[in_profile],
            drop=result.drop[in_profile],
            influence=result.influence[in_profile],
        ),
        pairs[in_profile, 1],
        labels_k.numel(),
    )
    return AuditWhy(pairs=pairs, influence=result.influence, profiles=profiles, top=top)


def _median_of(values: Tensor) -> Callable[[Tensor], float]:
    return lambda index: _nanmedian(values[index])


def _mean_of(values: Tensor) -> Callable[[Tensor], float]:
    return lambda index: float(values[index].double().mean())


def audit_intervals(
    model: SICModel, audit: AuditSet, explanation: Explanation
) -> dict[str, Interval | None]:
    """95 % bootstrap intervals of the explanation metrics that aggregate per-case values.

    Each is the stratified bootstrap (:func:`sic_core.metrics.bootstrap_interval`) of the
    same aggregate :func:`audit_metrics` reports (a mean or a median) over the cases it
    uses, withheld under the small-cell rule: ``xai/gini`` and
    ``xai/evidence_concentration`` over every audit case, ``xai/rma_lift`` and
    ``xai/pointing_game`` over the true positives with a lesion mask,
    ``xai/artifact_mass_lift`` over the cases with a marker mask (where there are any).
    The other metrics are not means over the audit cases and get no interval.
    """
    labels = audit.labels
    maps = explanation.target_maps()
    magnitude = explanation.evidence.abs()
    concentration = magnitude.max(dim=1).values / magnitude.sum(dim=1).clamp_min(1e-12)
    intervals: dict[str, Interval | None] = {
        str(XaiMetric.GINI): bootstrap_interval(_mean_of(gini(maps)), labels),
        str(XaiMetric.EVIDENCE_CONCENTRATION): bootstrap_interval(_mean_of(concentration), labels),
    }
    true_positive = (
        (labels > 0) & (explanation.predicted == labels) & audit.lesion.flatten(1).any(1)
    )
    truth_maps = explanation.class_maps[torch.arange(labels.numel()), labels][true_positive]
    lesions = audit.lesion[true_positive]
    strata = labels[true_positive]
    intervals[str(XaiMetric.RMA_LIFT)] = bootstrap_interval(
        _median_of(mass_lift(truth_maps, lesions)), strata
    )
    hits = torch.tensor(
        [pointing_game(truth_maps[i : i + 1], lesions[i : i + 1])[0] for i in range(len(strata))]
    )
    intervals[str(XaiMetric.POINTING_GAME)] = bootstrap_interval(_mean_of(hits), strata)
    marked = audit.marker.flatten(1).any(1)
    if marked.any():
        lifts = mass_lift(explanation.class_maps[marked, POSITIVE_CLASS], audit.marker[marked])
        intervals[str(XaiMetric.ARTIFACT_MASS_LIFT)] = bootstrap_interval(
            _median_of(lifts), labels[marked]
        )
    return intervals
