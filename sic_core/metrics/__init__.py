"""Metrics of predictions and explanations (batched PyTorch; each docstring states its formula)."""

from sic_core.metrics.classification import (
    auroc,
    balanced_accuracy,
    expected_calibration_error,
    reliability_bins,
)
from sic_core.metrics.maps import (
    completeness_max_rel_err,
    evidence_concentration,
    gini,
    mass_lift,
    pointing_game,
    robust_z,
    spearman,
    support_jaccard,
    top_support_agreement,
)
from sic_core.metrics.perturbation import (
    CounterfactualShift,
    DeletionInsertion,
    blur,
    deletion_insertion,
    inpaint,
    marker_counterfactual_shift,
    max_sensitivity,
    parameter_noise_rank_correlation,
)
from sic_core.metrics.sanity import (
    DataRandomisationResult,
    GridPointingResult,
    cascading_randomisation,
    data_randomisation,
    grid_pointing_game,
    grid_tile_scores,
    randomisation_layers,
)

__all__ = [
    "CounterfactualShift",
    "DataRandomisationResult",
    "DeletionInsertion",
    "GridPointingResult",
    "auroc",
    "balanced_accuracy",
    "blur",
    "cascading_randomisation",
    "completeness_max_rel_err",
    "data_randomisation",
    "deletion_insertion",
    "evidence_concentration",
    "expected_calibration_error",
    "gini",
    "grid_pointing_game",
    "grid_tile_scores",
    "inpaint",
    "marker_counterfactual_shift",
    "mass_lift",
    "max_sensitivity",
    "parameter_noise_rank_correlation",
    "pointing_game",
    "randomisation_layers",
    "reliability_bins",
    "robust_z",
    "spearman",
    "support_jaccard",
    "top_support_agreement",
]
