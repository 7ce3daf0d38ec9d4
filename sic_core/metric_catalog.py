"""What every logged metric means: one definition per key, for the auditor.

Each key that sicfed logs to MLflow (``perf/*``, ``xai/*``, ``flag/*``, ``dp/*``, ``data/*``,
``time/*``, ``train/*``, ``fed/*``, ``support/*``) or sends on the wire without logging it
has exactly one :class:`MetricDefinition` here. The report's dashboard
(:mod:`sic_core.report`) reads its names, directions and thresholds from this module, and
the docs site's metrics reference (``docs/reference/metrics.md``) is generated from it, so
the two cannot disagree.

The wire keys of :mod:`sic_core.wire` (``train.loss``, ``val.auroc``, ...) are tied to their
MLflow key by :attr:`MetricDefinition.wire_key` and :attr:`MetricDefinition.phase`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from sic_core.wire import EvalMetric, SupportMetric, TrainMetric, WhyMetric, XaiMetric

__all__ = [
    "METRICS",
    "Direction",
    "MetricDefinition",
    "Scope",
    "metric_anchor",
    "metric_definition",
    "wire_definition",
]


class Direction(StrEnum):
    """Which way a value is better (the dashboard prints these words)."""

    HIGHER = "higher is better"
    LOWER = "lower is better"
    NEAR_ZERO = "closer to 0 is better"
    NEITHER = "context: read the trend"


class Scope(StrEnum):
    """Where a key is found."""

    #: A site's child run ``site-<name>`` in MLflow, one value per round.
    SITE = "site run"
    #: The federation's parent run ``fed-<run id>`` in MLflow, one value per round.
    FEDERATION = "federation run"
    #: Sent by the site in its reply but not logged to MLflow.
    WIRE = "wire only"


@dataclass(frozen=True)
class MetricDefinition:
    """One metric key and what an auditor needs to read it.

    Attributes
    ----------
    key
        The MLflow key (for :attr:`Scope.WIRE` the wire key). ``{c}`` stands for a class
        index (``xai/support_jaccard/c{c}``).
    name
        Plain-language name.
    meaning
        What it measures, in one sentence.
    formula
        How it is computed.
    value_range
        The values it can take.
    direction
        Which way is better.
    action
        What an auditor should do when the value is out of its usual range.
    scope
        Where it is logged.
    phase, wire_key
        The message (``train``, ``support``, ``evaluate``) and the key it travels under in a
        site's reply, when it comes from a site.
    threshold, flagged_when
        The dashboard threshold and whether a value ``"above"`` or ``"below"`` it is marked.
    flag
        The ``flag/*`` key the server raises for it, if any.
    flag_rule
        The rule behind :attr:`flag` when it is not a fixed threshold.
    """

    key: str
    name: str
    meaning: str
    formula: str
    value_range: str
    direction: Direction
    action: str
    scope: Scope = Scope.SITE
    phase: str | None = None
    wire_key: str | None = None
    threshold: float | None = None
    flagged_when: str | None = None
    flag: str | None = None
    flag_rule: str | None = None

    def __post_init__(self) -> None:
        # Keys given as wire enums are stored as their plain text.
        object.__setattr__(self, "key", str(self.key))
        if self.wire_key is not None:
            object.__setattr__(self, "wire_key", str(self.wire_key))

    @property
    def family(self) -> str:
        """The key's prefix (``xai``, ``perf``, ...; ``wire`` for keys not logged)."""
        if self.scope is Scope.WIRE:
            return "wire"
        return self.key.split("/", 1)[0]

    def crosses(self, value: float) -> bool:
        """Whether ``value`` crosses this metric's threshold (``nan`` or no threshold: no)."""
        if self.threshold is None or not math.isfinite(value):
            return False
        if self.flagged_when == "below":
            return value < self.threshold
        return value > self.threshold

    def name_for(self, key: str) -> str:
        """:attr:`name` with the class index or phase that ``key`` fills in (``{c}``)."""
        pattern = "^" + re.escape(self.key).replace(r"\{c\}", "(?P<c>[0-9]+)")
        pattern = pattern.replace(r"\{phase\}", "(?P<phase>[a-z]+)") + "$"
        match = re.match(pattern, key)
        if match is None:
            return self.name
        return self.name.format(**match.groupdict())

    def rule(self) -> str:
        """The threshold or flag rule in words (empty if there is none)."""
        if self.flag_rule:
            return self.flag_rule
        if self.threshold is None:
            return ""
        return f"marked when {self.flagged_when} {self.threshold:g}"


_NAN_XAI = " `nan` (not logged) when it does not apply at the site this round."

METRICS: tuple[MetricDefinition, ...] = (
    # ----------------------------------------------------------------- performance
    MetricDefinition(
        key="perf/auroc",
        name="Validation AUROC",
        meaning="How well the model ranks positive cases above negative ones on the site's "
        "validation split, using support vectors swapped for the site's own nearest images.",
        formula="Mann-Whitney AUROC of `z_1 - z_0` (binary) or the mean one-vs-rest AUROC of "
        "`z_c` over the classes present; ties count 1/2.",
        value_range="0 to 1; 0.5 is chance",
        direction=Direction.HIGHER,
        action="Below 0.7, or falling while other sites rise: compare `perf/auroc_global_support`"
        " and `data/val_images`, and check the site's data with `python -m client check`. "
        "Not logged when the validation split lacks one of the outcomes.",
        phase="evaluate",
        wire_key=EvalMetric.AUROC,
    ),
    MetricDefinition(
        key="perf/auroc_global_support",
        name="AUROC with the global supports",
        meaning="The same AUROC with the federation's global support vectors kept as they are.",
        formula="As `perf/auroc`, with the merged global support vectors instead of the "
        "site's nearest real images.",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Far below `perf/auroc`: the global supports do not suit this site (its data "
        "differs from the others'); read its case gallery and drift.",
        phase="evaluate",
        wire_key=EvalMetric.AUROC_GLOBAL_SUPPORT,
    ),
    MetricDefinition(
        key="perf/balanced_accuracy",
        name="Balanced accuracy",
        meaning="Mean recall over the classes present, so a rare class counts as much as a "
        "common one.",
        formula="mean over classes c of TP_c / N_c at the predicted class (argmax of logits)",
        value_range="0 to 1; 1 / classes is chance",
        direction=Direction.HIGHER,
        action="Much lower than the AUROC suggests: the ranking is good but the operating "
        "point (bias) is off at this site; read the reliability diagram.",
        phase="evaluate",
        wire_key=EvalMetric.BALANCED_ACCURACY,
    ),
    MetricDefinition(
        key="perf/accuracy",
        name="Accuracy",
        meaning="Share of validation images whose predicted class is right.",
        formula="mean of [argmax_c z_c == label]",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Read it with the class counts of the data sheet: on an unbalanced split "
        "prefer balanced accuracy.",
        phase="evaluate",
        wire_key=EvalMetric.ACCURACY,
    ),
    MetricDefinition(
        key="perf/loss",
        name="Validation loss",
        meaning="Binary cross-entropy of the model on the site's validation split.",
        formula="mean BCE of the logits against one-hot labels (site-local supports)",
        value_range="0 and up; ln 2 = 0.693 is a model that says 0.5 everywhere",
        direction=Direction.LOWER,
        action="Rising over rounds while training loss falls: the model overfits or drifts "
        "away from this site's data.",
        phase="evaluate",
        wire_key=EvalMetric.LOSS,
    ),
    MetricDefinition(
        key="perf/ece",
        name="Expected calibration error",
        meaning="How far the calibrated probabilities' confidence is from the observed "
        "accuracy (the probabilities the report and the registered model show).",
        formula="sum over 15 equal confidence bins of (bin share) x |accuracy - confidence|, "
        "confidence = the calibrated probability of the predicted class (the round's "
        "federated temperature of the logit margin)",
        value_range="0 to 1; on 30-60 cases even a perfectly calibrated model shows 0.1-0.15",
        direction=Direction.LOWER,
        action="Above about 0.1: the probabilities should not be read as risks at this site; "
        "read the reliability diagrams in section 4 of the report and the interval.",
        phase="evaluate",
        wire_key=EvalMetric.ECE,
    ),
    MetricDefinition(
        key="perf/ece_raw",
        name="Expected calibration error before calibration",
        meaning="The same error for the uncalibrated scores (the per-class sigmoids "
        "normalised over classes).",
        formula="as `perf/ece`, confidence = sigmoid(z_c) / sum_c' sigmoid(z_c') of the "
        "predicted class",
        value_range="0 to 1",
        direction=Direction.NEITHER,
        action="Compare it with `perf/ece`: the gap is what the federated calibration corrects.",
        phase="evaluate",
        wire_key=EvalMetric.ECE_RAW,
    ),
    MetricDefinition(
        key="perf/auroc_ci_low",
        name="AUROC, lower 95 % bound",
        meaning="Lower end of the 95 % confidence interval of `perf/auroc`.",
        formula="DeLong's interval (Newcombe's score interval where the AUROC is 0 or 1); "
        "absent where a class has fewer than 10 validation cases",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="A wide interval means too few validation cases to compare sites on AUROC.",
        phase="evaluate",
        wire_key=EvalMetric.AUROC_CI_LOW,
    ),
    MetricDefinition(
        key="perf/auroc_ci_high",
        name="AUROC, upper 95 % bound",
        meaning="Upper end of the 95 % confidence interval of `perf/auroc`.",
        formula="as `perf/auroc_ci_low`",
        value_range="0 to 1",
        direction=Direction.NEITHER,
        action="Read with `perf/auroc_ci_low`.",
        phase="evaluate",
        wire_key=EvalMetric.AUROC_CI_HIGH,
    ),
    *(
        MetricDefinition(
            key=str(key),
            name=f"Why similar: {key.removeprefix('why/')}",
            meaning=f"How much the model's similarity between audit cases and their top "
            f"supports rests on {key.removeprefix('why/')}.",
            formula="mean over the audit cases' three strongest supports of drop_p / "
            "sum_q |drop_q|, drop_p = similarity minus its mean when property p is "
            "perturbed (both directions, case side and support side)",
            value_range="-1 to 1; the five values' magnitudes sum to at most 1",
            direction=Direction.NEITHER,
            action="A profile that differs from the other sites' (or a support's from the "
            "others') means the model matches cases for another reason there: look at the "
            "gallery's why-similar lines.",
            phase="evaluate",
            wire_key=key,
        )
        for key in WhyMetric
    ),
    MetricDefinition(
        key="perf/mean_site_auroc",
        name="Mean site AUROC",
        meaning="The unweighted mean of the evaluated sites' validation AUROC this round.",
        formula="mean over sites of `perf/auroc`",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Compare it with `perf/min_site_auroc`: a large gap means one site is left "
        "behind; find it in the federation summary.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="perf/min_site_auroc",
        name="Lowest site AUROC",
        meaning="The validation AUROC of the worst site this round.",
        formula="min over sites of `perf/auroc`",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Open that site's report: its data sheet, its flags and its case gallery.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="perf/auroc_weighted",
        name="Example-weighted AUROC",
        meaning="The sites' validation AUROC averaged with each site's number of validation "
        "images as weight.",
        formula="sum_s n_s AUROC_s / sum_s n_s",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Far above the mean site AUROC: the large sites do well and the small ones do not.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="perf/balanced_accuracy_weighted",
        name="Example-weighted balanced accuracy",
        meaning="The sites' balanced accuracy averaged with their validation images as weight.",
        formula="sum_s n_s BA_s / sum_s n_s",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Read it beside `perf/auroc_weighted`, as for a single site.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="perf/loss_weighted",
        name="Example-weighted validation loss",
        meaning="The sites' validation loss averaged with their validation images as weight.",
        formula="sum_s n_s loss_s / sum_s n_s",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="Rising over rounds: the global model gets worse on the sites' data; check "
        "which site's `perf/loss` rises.",
        scope=Scope.FEDERATION,
    ),
    # ----------------------------------------------------------------- explanation quality
    MetricDefinition(
        key=XaiMetric.COMPLETENESS,
        name="Completeness error",
        meaning="Whether the explanation maps add up exactly to the class scores, as SIC promises.",
        formula="max over audit images and classes of |sum_p R^c_p - E_c| / max(|E_c|, 1e-6) "
        "and of |E_c + b - z_c|, where E_c is the class's summed evidence",
        value_range="0 and up; about 1e-6 in float32",
        direction=Direction.LOWER,
        action="Above 1e-4 the maps are not exact: this is a software fault, not a finding "
        "about the data. Do not read this site's maps; report it to the coordinator with the "
        "run id and round.",
        phase="evaluate",
        wire_key=XaiMetric.COMPLETENESS,
        threshold=1e-4,
        flagged_when="above",
        flag="flag/completeness",
    ),
    MetricDefinition(
        key=XaiMetric.RMA_LIFT,
        name="Lesion evidence lift",
        meaning="How much more of the positive evidence falls on the marked lesion than its "
        "area share would give by chance.",
        formula="median over correctly detected lesion cases of (sum_{p in M} R+ / sum_p R+) "
        "/ (|M| / HW), M the lesion mask",
        value_range="0 up to HW / |M|; 1 is chance",
        direction=Direction.HIGHER,
        action="Below 1 the model is right for reasons other than the lesion: read the case "
        "gallery, then the shortcut metrics. Applies only where lesion masks exist." + _NAN_XAI,
        phase="evaluate",
        wire_key=XaiMetric.RMA_LIFT,
        threshold=1.0,
        flagged_when="below",
    ),
    MetricDefinition(
        key=XaiMetric.POINTING_GAME,
        name="Pointing game",
        meaning="Share of correctly detected lesion cases whose strongest pixel of evidence "
        "lies on the lesion.",
        formula="mean of [argmax_p R^c_p in M dilated by 3 px]",
        value_range="0 to 1; chance is `xai/pointing_game_baseline`",
        direction=Direction.HIGHER,
        action="Near its baseline: the strongest evidence is not on the lesion; read the "
        "gallery." + _NAN_XAI,
        phase="evaluate",
        wire_key=XaiMetric.POINTING_GAME,
    ),
    MetricDefinition(
        key=XaiMetric.POINTING_GAME_BASELINE,
        name="Pointing game by chance",
        meaning="The pointing game a uniformly random pixel would score on the same cases.",
        formula="mean share of the image covered by the dilated lesion masks",
        value_range="0 to 1",
        direction=Direction.NEITHER,
        action="None: it is the reference for `xai/pointing_game`." + _NAN_XAI,
        phase="evaluate",
        wire_key=XaiMetric.POINTING_GAME_BASELINE,
    ),
    MetricDefinition(
        key=XaiMetric.ARTIFACT_MASS_LIFT,
        name="Shortcut (marker) evidence lift",
        meaning="How much more of the positive evidence falls on a burned-in marker than its "
        "area share would give by chance.",
        formula="median over marked audit images of (sum_{p in A} R+ / sum_p R+) / "
        "(|A| / HW), A the marker mask; sites without marked images measure 8 audit cases "
        "with the public marker pasted in",
        value_range="0 and up; 1 is chance",
        direction=Direction.LOWER,
        action="Above 2 the model puts evidence on the marker. Read "
        "`xai/marker_counterfactual_shift`: a shift near 0 means mere sensitivity to bright "
        "text, a clear positive shift means a learned shortcut; then look at the site's "
        "positive support images for the marker.",
        phase="evaluate",
        wire_key=XaiMetric.ARTIFACT_MASS_LIFT,
        threshold=2.0,
        flagged_when="above",
        flag="flag/artifact_mass_lift",
    ),
    MetricDefinition(
        key=XaiMetric.MARKER_COUNTERFACTUAL_SHIFT,
        name="Marker counterfactual shift",
        meaning="How much the positive-class probability changes when the marker is removed "
        "from marked images or pasted onto clean ones.",
        formula="mean over pairs of sigmoid(z_pos with marker) - sigmoid(z_pos without), the "
        "marker inpainted from its surroundings or pasted in place",
        value_range="-1 to 1; 0 means the marker does not matter",
        direction=Direction.NEAR_ZERO,
        action="This, not the lift flag, tells a learned shortcut from mere sensitivity: a "
        "shift well above the other sites' (0.05 and more) means the marker raises the "
        "prediction; ask the site to check its positive cases for burned-in text.",
        phase="evaluate",
        wire_key=XaiMetric.MARKER_COUNTERFACTUAL_SHIFT,
    ),
    MetricDefinition(
        key=XaiMetric.MARKER_COUNTERFACTUAL_FLIPS,
        name="Marker counterfactual flips",
        meaning="Share of the marker pairs whose predicted class changes with the marker.",
        formula="mean over pairs of [argmax with marker != argmax without]",
        value_range="0 to 1",
        direction=Direction.LOWER,
        action="Any flips: the marker alone decides some predictions; treat it as a "
        "shortcut, as for a large counterfactual shift.",
        phase="evaluate",
        wire_key=XaiMetric.MARKER_COUNTERFACTUAL_FLIPS,
    ),
    MetricDefinition(
        key=XaiMetric.DELETION_AUC,
        name="Deletion curve area",
        meaning="How fast the predicted class's score falls when the most relevant pixels "
        "are removed first.",
        formula="area under the target logit as the top-ranked pixels of R^c are replaced "
        "by a blurred copy in 8 steps (trapezoid over [0, 1]), mean over 8 audit cases",
        value_range="any real number (logit units)",
        direction=Direction.LOWER,
        action="Read it with `xai/deletion_random_gap`: on its own it depends on the logit scale.",
        phase="evaluate",
        wire_key=XaiMetric.DELETION_AUC,
    ),
    MetricDefinition(
        key=XaiMetric.INSERTION_AUC,
        name="Insertion curve area",
        meaning="How fast the predicted class's score rises when the most relevant pixels are "
        "restored first into a blurred image.",
        formula="area under the target logit as the top-ranked pixels of R^c are restored "
        "into the blurred copy in 8 steps, mean over 8 audit cases",
        value_range="any real number (logit units)",
        direction=Direction.HIGHER,
        action="Read it with `xai/insertion_random_gap`.",
        phase="evaluate",
        wire_key=XaiMetric.INSERTION_AUC,
    ),
    MetricDefinition(
        key=XaiMetric.DELETION_RANDOM_GAP,
        name="Deletion gain over random order",
        meaning="How much faster the score falls when pixels are removed in the map's order "
        "than in a random order.",
        formula="deletion AUC (random order) - `xai/deletion_auc`",
        value_range="any real number; 0 means the map ranks pixels no better than chance",
        direction=Direction.HIGHER,
        action="At or below 0: the map does not point at the pixels the model uses "
        "(unfaithful); run `python -m client sanity` at the site.",
        phase="evaluate",
        wire_key=XaiMetric.DELETION_RANDOM_GAP,
    ),
    MetricDefinition(
        key=XaiMetric.INSERTION_RANDOM_GAP,
        name="Insertion gain over random order",
        meaning="How much faster the score rises when pixels are restored in the map's order "
        "than in a random order.",
        formula="`xai/insertion_auc` - insertion AUC (random order)",
        value_range="any real number; 0 means no better than chance",
        direction=Direction.HIGHER,
        action="At or below 0: as for `xai/deletion_random_gap`.",
        phase="evaluate",
        wire_key=XaiMetric.INSERTION_RANDOM_GAP,
    ),
    MetricDefinition(
        key=XaiMetric.GINI,
        name="Map sparseness (Gini)",
        meaning="How concentrated the explanation maps are: 0 spread evenly, towards 1 on a "
        "few pixels.",
        formula="mean over audit images of the Gini index of |R| over the pixels",
        value_range="0 to 1",
        direction=Direction.NEITHER,
        action="None on its own; a sudden change between rounds says the model changed what "
        "it looks at: read the gallery.",
        phase="evaluate",
        wire_key=XaiMetric.GINI,
    ),
    MetricDefinition(
        key=XaiMetric.EVIDENCE_CONCENTRATION,
        name="Evidence concentration",
        meaning="How much of an image's evidence comes from its single strongest support vector.",
        formula="mean over audit images of max_k |e_k| / sum_k |e_k|",
        value_range="1 / K to 1 (K support vectors)",
        direction=Direction.NEITHER,
        action="Near 1 in every round: the model leans on one support case; look at that "
        "case in the support set (section 8).",
        phase="evaluate",
        wire_key=XaiMetric.EVIDENCE_CONCENTRATION,
    ),
    MetricDefinition(
        key=XaiMetric.TOP_SUPPORT_AGREEMENT,
        name="Top-support agreement with last round",
        meaning="Share of audit images whose strongest support case is the same as in the "
        "previous round.",
        formula="mean over audit images of [top support id this round == last round's]",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="Low late in training: the support cases still change, so do not show them to "
        "clinicians yet. `nan` in a site's first evaluated round.",
        phase="evaluate",
        wire_key=XaiMetric.TOP_SUPPORT_AGREEMENT,
    ),
    MetricDefinition(
        key="xai/support_jaccard/c{c}",
        name="Support-set stability of class {c}",
        meaning="Overlap of the class's support images this round and last round.",
        formula="|A ∩ B| / |A ∪ B| of the two rounds' support image ids of the class",
        value_range="0 to 1",
        direction=Direction.HIGHER,
        action="As for `xai/top_support_agreement`: rising towards 1 as training converges. "
        "`nan` in a site's first evaluated round.",
        phase="evaluate",
        wire_key="xai/support_jaccard/c{c}",
    ),
    MetricDefinition(
        key=XaiMetric.MAX_SENSITIVITY,
        name="Explanation sensitivity to noise",
        meaning="How much the explanation changes under tiny image perturbations that leave "
        "the prediction unchanged.",
        formula="mean over 8 audit images of max over 2 draws of ||R(x + d) - R(x)|| / ||R(x)||,"
        " d uniform in [-0.02, 0.02] per pixel",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="Much higher than at the other sites: this site's explanations are fragile; "
        "do not base a finding on a single case map.",
        phase="evaluate",
        wire_key=XaiMetric.MAX_SENSITIVITY,
    ),
    MetricDefinition(
        key=XaiMetric.DP_NOISE_RANK_CORR,
        name="Explanation stability under weight noise",
        meaning="How similar the maps stay when the model's weights get small Gaussian noise, "
        "like the noise of differentially private training.",
        formula="median over 8 audit images of the Spearman correlation of R before and after "
        "N(0, 0.01^2) noise on every trainable weight",
        value_range="-1 to 1",
        direction=Direction.HIGHER,
        action="Low: the maps depend on details that privacy noise would change; read them "
        "as rough locations, not pixel by pixel.",
        phase="evaluate",
        wire_key=XaiMetric.DP_NOISE_RANK_CORR,
    ),
    MetricDefinition(
        key=XaiMetric.DRIFT_TO_GLOBAL,
        name="Drift from the global explanation",
        meaning="How differently the site's model (with its local supports) and the global "
        "model explain the same public probe images.",
        formula="1 - median over 8 public probe images of Spearman(R+ local, R+ global)",
        value_range="0 to 2; 0 means identical rankings",
        direction=Direction.LOWER,
        action="Flagged as an outlier: this site's supports make the model look at other "
        "things than elsewhere; compare its gallery and support set with another site's.",
        phase="evaluate",
        wire_key=XaiMetric.DRIFT_TO_GLOBAL,
        flag="flag/drift_outlier",
        flag_rule="flagged when its robust z-score among the sites, (v - median) / (1.4826 "
        "MAD), is above 3 (needs at least 3 sites)",
    ),
    # ----------------------------------------------------------------- flags
    MetricDefinition(
        key="flag/completeness",
        name="Completeness flag",
        meaning="1 when the site's completeness error is above its hard gate this round.",
        formula="[`xai/completeness_max_rel_err` > 1e-4]",
        value_range="0 or 1",
        direction=Direction.LOWER,
        action="Do not read the site's maps this round; report the run id and round to the "
        "coordinator.",
    ),
    MetricDefinition(
        key="flag/artifact_mass_lift",
        name="Shortcut flag",
        meaning="1 when the site's marker evidence lift is above its threshold this round.",
        formula="[`xai/artifact_mass_lift` > 2]",
        value_range="0 or 1",
        direction=Direction.LOWER,
        action="Read `xai/marker_counterfactual_shift` for the same site and round (see "
        "`xai/artifact_mass_lift`).",
    ),
    MetricDefinition(
        key="flag/drift_outlier",
        name="Drift outlier flag",
        meaning="1 when the site's drift from the global explanation is an outlier among the "
        "sites this round.",
        formula="[robust z of `xai/drift_to_global` among >= 3 sites > 3]",
        value_range="0 or 1",
        direction=Direction.LOWER,
        action="Compare the site's case gallery and support set with another site's.",
    ),
    MetricDefinition(
        key="fed/flagged_sites",
        name="Flagged sites",
        meaning="How many sites raised at least one flag this round.",
        formula="count of sites with any `flag/*` = 1",
        value_range="0 to the number of sites",
        direction=Direction.LOWER,
        action="Above 0: open the federation summary; flagged sites are listed first.",
        scope=Scope.FEDERATION,
    ),
    # ----------------------------------------------------------------- privacy
    MetricDefinition(
        key="dp/epsilon",
        name="Privacy spent (ε)",
        meaning="The site's total differential-privacy budget spent so far, over every run it "
        "took part in.",
        formula="ε at the site's `privacy.target_delta` of every DP-SGD step and support "
        "release in its privacy ledger, composed with Opacus' RDP accountant",
        value_range="0 (no DP) and up; the site refuses to train above `privacy.max_epsilon`",
        direction=Direction.LOWER,
        action="Close to the site's `max_epsilon`: the site will soon refuse to train "
        "(`privacy_budget_exhausted`); the site decides whether to raise it.",
        phase="train",
        wire_key=TrainMetric.DP_EPSILON,
    ),
    # ----------------------------------------------------------------- data
    MetricDefinition(
        key="data/train_images",
        name="Training images",
        meaning="How many training images the site trained on this round (its FedAvg weight).",
        formula="size of the site's training split",
        value_range="0 and up",
        direction=Direction.NEITHER,
        action="A sudden change: the site's data changed between rounds; ask the site.",
        phase="train",
        wire_key=TrainMetric.NUM_EXAMPLES,
    ),
    MetricDefinition(
        key="data/support_images",
        name="Images behind the support statistics",
        meaning="How many training images the site summarised for the global support set.",
        formula="number of embeddings in the site's per-class cluster sums",
        value_range="0 and up",
        direction=Direction.NEITHER,
        action="Should equal `data/train_images`; if not, the site's data changed mid-round.",
        phase="support",
        wire_key=SupportMetric.NUM_EXAMPLES,
    ),
    MetricDefinition(
        key="data/classes_present",
        name="Classes present",
        meaning="How many classes have at least one training image at the site.",
        formula="count of classes with a non-empty training split",
        value_range="1 to the number of classes",
        direction=Direction.NEITHER,
        action="Fewer than the federation's classes: the site cannot contribute supports for "
        "the missing ones; its AUROC may be undefined.",
        phase="support",
        wire_key=SupportMetric.CLASSES_PRESENT,
    ),
    MetricDefinition(
        key="data/val_images",
        name="Validation images",
        meaning="How many validation images the site evaluated on this round.",
        formula="size of the site's validation split",
        value_range="0 and up",
        direction=Direction.NEITHER,
        action="Small (below about 50): read the site's AUROC with its confidence interval in "
        "the report.",
        phase="evaluate",
        wire_key=EvalMetric.NUM_EXAMPLES,
    ),
    MetricDefinition(
        key="data/quarantined",
        name="Quarantined files",
        meaning="How many of the site's files its data pipeline skipped (unreadable or "
        "unsuitable), counted but never named.",
        formula="count of entries in the site's quarantine list",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="Above 0: the site's report lists the counts by reason; the site's IT reads "
        "the paths in its own `quarantine.json`.",
        phase="train",
        wire_key=TrainMetric.QUARANTINED,
    ),
    MetricDefinition(
        key="support/local_supports",
        name="Local supports",
        meaning="How many global support vectors the site replaced by its own nearest real "
        "training image for evaluation.",
        formula="count of support vectors with a local nearest image (classes absent at the "
        "site keep the global vector)",
        value_range="0 to the number of support vectors",
        direction=Direction.NEITHER,
        action="Below the number of support vectors: some class has no training images here.",
        phase="evaluate",
        wire_key=EvalMetric.LOCAL_SUPPORTS,
    ),
    # ----------------------------------------------------------------- training
    MetricDefinition(
        key="train/loss",
        name="Training loss",
        meaning="Mean loss of the site's last local epoch (in the federation run: the mean "
        "over the sites, weighted by their training images).",
        formula="mean BCE over the last local epoch's batches",
        value_range="0 and up; ln 2 = 0.693 is the collapsed plateau",
        direction=Direction.LOWER,
        action="Stuck at 0.69: the site's training has collapsed; see `train/collapsed`.",
        phase="train",
        wire_key=TrainMetric.LOSS,
    ),
    MetricDefinition(
        key="train/epochs",
        name="Local epochs",
        meaning="How many local epochs the site ran this round.",
        formula="count",
        value_range="1 and up (the run's `local-epochs`)",
        direction=Direction.NEITHER,
        action="Differs from the run's `local-epochs`: report it to the coordinator.",
        phase="train",
        wire_key=TrainMetric.EPOCHS,
    ),
    MetricDefinition(
        key="train/collapsed",
        name="Training collapsed",
        meaning="1 when the site's local training ended collapsed (every image embedded alike, "
        "loss at ln 2); the server then leaves the update out.",
        formula="[final loss within 1e-3 of ln 2 and mean pairwise embedding cosine > 0.99]",
        value_range="0 or 1",
        direction=Direction.LOWER,
        action="1: the site's update was rejected with reason `collapsed`; repeated, ask the "
        "coordinator to start from a public warm start or lower `lr`.",
        phase="train",
        wire_key=TrainMetric.COLLAPSED,
    ),
    # ----------------------------------------------------------------- federation
    MetricDefinition(
        key="fed/{phase}_ok",
        name="Site's {phase} reply accepted",
        meaning="1 when the site's reply in that phase (train, support, evaluate) was "
        "accepted this round, 0 when it failed, was rejected or never came.",
        formula="[reply status == ok]",
        value_range="0 or 1",
        direction=Direction.HIGHER,
        action="0: the round table's failures column and the run's audit log name the reason "
        "(see Troubleshooting).",
    ),
    MetricDefinition(
        key="fed/{phase}_sites_ok",
        name="Sites accepted in {phase}",
        meaning="How many sites' replies were accepted in that phase this round.",
        formula="count of accepted replies",
        value_range="0 to the number of sites",
        direction=Direction.HIGHER,
        action="Below the number of joined sites: read `fed/{phase}_sites_failed`.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="fed/{phase}_sites_failed",
        name="Sites failed in {phase}",
        meaning="How many sampled sites failed, were rejected or did not reply in that phase.",
        formula="count of replies with another status than ok (absent sites included)",
        value_range="0 to the number of sites",
        direction=Direction.LOWER,
        action="Above 0: the round table's failures column names each site and reason.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="fed/train_sites_clipped",
        name="Sites clipped",
        meaning="How many sites' updates were scaled down to the update bound this round.",
        formula="count of updates longer than `update-clip-factor` x the running lower median norm",
        value_range="0 to the number of sites",
        direction=Direction.LOWER,
        action="The same site clipped round after round: its updates are unusually large "
        "(poisoned, or very different data); the audit log has its norm and the bound.",
        scope=Scope.FEDERATION,
    ),
    # ----------------------------------------------------------------- time
    MetricDefinition(
        key="time/round_s",
        name="Round wall time",
        meaning="Seconds the whole round took at the server (three phases and the checkpoint).",
        formula="monotonic clock at round end - at round start",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="Much longer than earlier rounds: a site is slow or waited out; compare the "
        "sites' `time/*_s`.",
        scope=Scope.FEDERATION,
    ),
    MetricDefinition(
        key="time/train_s",
        name="Local training time",
        meaning="Seconds of local training inside the site's train handler.",
        formula="handler wall time",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="The slowest site sets the round's pace; ask it about its hardware.",
        phase="train",
        wire_key=TrainMetric.SECONDS,
    ),
    MetricDefinition(
        key="time/train_startup_s",
        name="Train start-up time",
        meaning="Seconds from the start of the site's process to its train handler.",
        formula="handler start - process start",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="Many seconds: the site runs `join --cold`; the default warm launcher avoids it.",
        phase="train",
        wire_key=TrainMetric.STARTUP,
    ),
    MetricDefinition(
        key="time/support_s",
        name="Support statistics time",
        meaning="Seconds the site spent computing its support statistics.",
        formula="handler wall time",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="As for `time/train_s`.",
        phase="support",
        wire_key=SupportMetric.SECONDS,
    ),
    MetricDefinition(
        key="time/support_startup_s",
        name="Support start-up time",
        meaning="Seconds from the start of the site's process to its support handler.",
        formula="handler start - process start",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="As for `time/train_startup_s`.",
        phase="support",
        wire_key=SupportMetric.STARTUP,
    ),
    MetricDefinition(
        key="time/eval_s",
        name="Evaluation time",
        meaning="Seconds the site spent evaluating, explanation audit and report included.",
        formula="handler wall time",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="As for `time/train_s`; `time/xai_s` is its explanation part.",
        phase="evaluate",
        wire_key=EvalMetric.SECONDS,
    ),
    MetricDefinition(
        key="time/eval_startup_s",
        name="Evaluation start-up time",
        meaning="Seconds from the start of the site's process to its evaluate handler.",
        formula="handler start - process start",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="As for `time/train_startup_s`.",
        phase="evaluate",
        wire_key=EvalMetric.STARTUP,
    ),
    MetricDefinition(
        key="time/xai_s",
        name="Explanation audit time",
        meaning="Seconds of the explanation-quality metrics and the report (part of "
        "`time/eval_s`).",
        formula="wall time of the audit and the report",
        value_range="0 and up",
        direction=Direction.LOWER,
        action="Large: the site's `reporting.audit_set_size` or image size is large.",
        phase="evaluate",
        wire_key=EvalMetric.XAI_SECONDS,
    ),
    # ----------------------------------------------------------------- wire only
    MetricDefinition(
        key=EvalMetric.AUROC_DEFINED,
        name="AUROC defined",
        meaning="1 when the site's validation split holds both outcomes of at least one "
        "class, so that its AUROC means something.",
        formula="[some class has positive and negative validation images]",
        value_range="0 or 1",
        direction=Direction.HIGHER,
        action="0: the site's `perf/auroc` is not logged this round; its validation split is "
        "too small or holds one class only.",
        scope=Scope.WIRE,
        phase="evaluate",
        wire_key=EvalMetric.AUROC_DEFINED,
    ),
)

_BY_KEY: dict[str, MetricDefinition] = {m.key: m for m in METRICS}
_PATTERNS: tuple[tuple[re.Pattern[str], MetricDefinition], ...] = tuple(
    (
        re.compile(
            "^"
            + re.escape(m.key)
            .replace(re.escape("{c}"), "[0-9]+")
            .replace(re.escape("{phase}"), "(train|support|evaluate)")
            + "$"
        ),
        m,
    )
    for m in METRICS
    if "{" in m.key
)
_BY_WIRE: dict[tuple[str, str], MetricDefinition] = {
    (m.phase, m.wire_key): m for m in METRICS if m.phase and m.wire_key
}


def metric_definition(key: str) -> MetricDefinition | None:
    """The definition of an MLflow (or wire-only) key, ``None`` if the catalog lacks it.

    Keys with a class index or phase (``xai/support_jaccard/c1``, ``fed/train_ok``) find
    their template's entry.
    """
    found = _BY_KEY.get(key)
    if found is not None:
        return found
    for pattern, definition in _PATTERNS:
        if pattern.match(key):
            return definition
    return None


def wire_definition(phase: str, wire_key: str) -> MetricDefinition | None:
    """The definition of a key in a site's ``phase`` reply (``train.loss``, ``xai/gini``)."""
    found = _BY_WIRE.get((phase, wire_key))
    if found is None and phase == "evaluate" and wire_key.startswith("xai/support_jaccard/"):
        return metric_definition(wire_key)
    return found


def metric_anchor(key: str) -> str:
    """The HTML anchor of a key's entry (the docs page and the report use the same)."""
    definition = metric_definition(key)
    base = definition.key if definition is not None else key
    return re.sub(r"[^a-z0-9_]+", "-", re.sub(r"[{}]", "", base.lower())).strip("-")
