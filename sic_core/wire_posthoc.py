"""Wire and MLflow keys of the black-box twin and of the post-hoc explanation comparison.

Beside :mod:`sic_core.wire`, for the comparison of SIC's exact maps with post-hoc
explanations (of the black-box twin, and Grad-CAM of SIC itself). The names are a contract
that outside checks read:

- ``posthoc/<method>/<metric>``: one value per method and metric, per site run at
  ``step=round`` (and per run in ``bench/results/explainers.json``);
- ``baseline/perf/auroc``: the twin's validation AUROC.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "COMPLETE_METHODS",
    "METHOD_NAMES",
    "POSTHOC_METHODS",
    "SIC_METHOD",
    "BaselineMetric",
    "PosthocMetric",
    "posthoc_key",
    "posthoc_metric_keys",
]

#: SIC's own exact contribution maps.
SIC_METHOD = "sic"
#: Post-hoc methods; ``sic_gradcam`` is Grad-CAM applied to SIC, the others explain the twin.
POSTHOC_METHODS: tuple[str, ...] = (
    "gradcam",
    "eigencam",
    "saliency",
    "integrated_gradients",
    "occlusion",
    "lime",
    "kernel_shap",
    "iba",
    "sic_gradcam",
)
#: Every method scored, SIC first.
METHOD_NAMES: tuple[str, ...] = (SIC_METHOD, *POSTHOC_METHODS)
#: Methods whose maps define completeness (their sum is a known difference of outputs).
COMPLETE_METHODS: frozenset[str] = frozenset({SIC_METHOD, "integrated_gradients"})


class PosthocMetric(StrEnum):
    """The ``<metric>`` part of ``posthoc/<method>/<metric>``."""

    #: Median relevance-mass lift on true positives with a lesion mask (higher is better).
    RMA_LIFT = "rma_lift"
    #: Share of those cases whose map maximum lies in the dilated lesion (higher is better).
    POINTING_GAME = "pointing_game"
    #: Area under the target-logit deletion curve (lower is better).
    DELETION_AUC = "deletion_auc"
    #: Area under the target-logit insertion curve (higher is better).
    INSERTION_AUC = "insertion_auc"
    #: Random-order deletion AUC minus the map's (higher is better).
    DELETION_RANDOM_GAP = "deletion_random_gap"
    #: The map's insertion AUC minus the random order's (higher is better).
    INSERTION_RANDOM_GAP = "insertion_random_gap"
    #: Mean Spearman correlation of trained and cascade-randomised maps (lower is better).
    RANDOMISATION_RANK_CORR = "randomisation_rank_corr"
    #: Mean worst relative map change under small input noise (lower is better).
    MAX_SENSITIVITY = "max_sensitivity"
    #: Median positive-evidence share on the marker over its area share (about 1 or less).
    ARTIFACT_MASS_LIFT = "artifact_mass_lift"
    #: Mean change of p(positive) when the marker is removed or pasted (a model property).
    MARKER_COUNTERFACTUAL_SHIFT = "marker_counterfactual_shift"
    #: Seconds to explain one image (lower is better).
    SECONDS_PER_IMAGE = "seconds_per_image"
    #: Completeness error, only for methods that define completeness (lower is better).
    COMPLETENESS_MAX_REL_ERR = "completeness_max_rel_err"


class BaselineMetric(StrEnum):
    """Performance keys of the black-box twin."""

    AUROC = "baseline/perf/auroc"


def posthoc_key(method: str, metric: str) -> str:
    """``posthoc/<method>/<metric>``; raises ``ValueError`` for an unknown method or metric."""
    if method not in METHOD_NAMES:
        raise ValueError(f"method: expected one of {METHOD_NAMES}, got {method!r}")
    if metric not in set(PosthocMetric):
        raise ValueError(
            f"metric: expected one of {[str(m) for m in PosthocMetric]}, got {metric!r}"
        )
    return f"posthoc/{method}/{metric}"


def posthoc_metric_keys(methods: tuple[str, ...] = METHOD_NAMES) -> frozenset[str]:
    """Every ``posthoc/*`` key of ``methods`` (completeness only where it is defined)."""
    keys = set()
    for method in methods:
        for metric in PosthocMetric:
            if metric is PosthocMetric.COMPLETENESS_MAX_REL_ERR and method not in COMPLETE_METHODS:
                continue
            keys.add(posthoc_key(method, metric))
    return frozenset(keys)
