"""Wire vocabulary shared by the ClientApp and the ServerApp.

Every key that crosses a site's boundary is defined here once, as a ``StrEnum``, so that
``client/`` and ``server/`` (which never import each other) agree on the message layout.

One round exchanges three messages per site (server -> site | site -> server):

- ``train``: ``arrays`` (global weights), ``support`` (global support), ``config`` |
  ``arrays`` (weights, B-cos filters at unit length), ``metrics`` (:class:`TrainMetric`),
  ``site``.
- ``query.support``: ``arrays``, ``support``, ``config`` | ``stats`` (per-class cluster sums
  and counts),
  ``metrics`` (:class:`SupportMetric`), ``site``.
- ``query.calibration``: ``arrays``, ``support`` (the new global support set), ``config`` |
  ``stats`` (:attr:`ArrayKey.MARGIN_COUNTS`: binned validation margins,
  :mod:`sic_core.calibration`), ``metrics`` (:class:`CalibrationMetric`), ``site``.
- ``evaluate``: ``arrays``, ``support``, ``config`` (with :attr:`ConfigKey.CALIBRATION`) |
  ``metrics`` (:class:`EvalMetric` plus
  the explanation-quality keys of :func:`xai_metric_keys`), ``report`` (the site's round
  report, redacted unless the site allows sharing example images), ``site``.

Nothing else may leave a site: no pixels (but in a report the site's config allows to share),
file names, patient ids, per-image embeddings or
free-text exception messages (a failure travels as one :class:`ErrorReason` code).
"""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = [
    "CALIBRATION_METRIC_KEYS",
    "ERROR_REASON_PATTERN",
    "EVAL_METRIC_KEYS",
    "SITE_DEVICE_PATTERN",
    "SITE_NAME_PATTERN",
    "SUPPORT_BUFFER_KEYS",
    "SUPPORT_METRIC_KEYS",
    "TRAIN_METRIC_KEYS",
    "ArrayKey",
    "CalibrationMetric",
    "ConfigKey",
    "ErrorReason",
    "EvalMetric",
    "QueryName",
    "RecordKey",
    "ReportKey",
    "SiteKey",
    "SupportMetric",
    "TrainMetric",
    "WhyMetric",
    "XaiMetric",
    "eval_metric_keys",
    "eval_nan_allowed_keys",
    "format_error",
    "is_error_reason",
    "parse_error",
    "support_jaccard_key",
    "xai_metric_keys",
]


class RecordKey(StrEnum):
    """Keys of the records inside a message's ``RecordDict``."""

    #: ``ArrayRecord`` of model weights (state-dict keys, support buffers excluded).
    ARRAYS = "arrays"
    #: ``ArrayRecord`` with the global support set (:attr:`ArrayKey.VECTORS`, ``LABELS``).
    SUPPORT = "support"
    #: ``ConfigRecord`` of round settings (server -> site).
    CONFIG = "config"
    #: ``MetricRecord`` of a reply (fixed schema per message type).
    METRICS = "metrics"
    #: ``ConfigRecord`` naming the replying site (:class:`SiteKey`).
    SITE = "site"
    #: ``ArrayRecord`` of per-class cluster statistics (``SUMS``, ``COUNTS``).
    STATS = "stats"
    #: ``ConfigRecord`` holding the site's round report (:class:`ReportKey`).
    REPORT = "report"


class ReportKey(StrEnum):
    """Keys of the ``report`` ``ConfigRecord`` of an ``evaluate`` reply."""

    #: The report as one JSON document (see :mod:`sic_core.report`).
    JSON = "json"


class ArrayKey(StrEnum):
    """Array names inside the ``support`` and ``stats`` records."""

    #: ``(K, D)`` float32 support vectors, class order.
    VECTORS = "vectors"
    #: ``(K,)`` int64 class of each support vector.
    LABELS = "labels"
    #: ``(C, n_shot, D)`` float32 per-class cluster sums of a site's embeddings.
    SUMS = "sums"
    #: ``(C, n_shot)`` float32 number of images in each cluster (Gaussian-noised under DP,
    #: so possibly fractional or negative).
    COUNTS = "counts"
    #: ``(C, 2, bins)`` int64 binned validation margins (``sic_core.calibration``).
    MARGIN_COUNTS = "margin-counts"


class QueryName(StrEnum):
    """Names of ``query`` handlers (message type ``query.<name>``)."""

    SUPPORT = "support"
    CALIBRATION = "calibration"


class ConfigKey(StrEnum):
    """Keys of the round ``ConfigRecord`` sent to sites with every message.

    The model specification travels with each message, so a site needs nothing but the
    message and its own config to rebuild the global model.
    """

    SERVER_ROUND = "server-round"
    ENCODER = "encoder"
    NUM_CLASSES = "num-classes"
    N_SHOT = "n-shot"
    PROJ_DIM = "proj-dim"
    IMAGE_SIZE = "image-size"
    LOCAL_EPOCHS = "local-epochs"
    LR = "lr"
    BATCH_SIZE = "batch-size"
    SEED = "seed"
    #: FedProx's proximal weight (key chosen by Flower's ``FedProx``).
    PROXIMAL_MU = "proximal-mu"
    #: Train with DP-SGD against the fixed global support (bool).
    DP = "dp"
    #: Rounds (from the first) whose local epochs train against the public class anchors.
    ANCHOR_ROUNDS = "anchor-rounds"
    #: The round's global calibration (``evaluate`` only): JSON of
    #: :meth:`sic_core.calibration.Calibration.to_dict`; absent before the first fit.
    CALIBRATION = "calibration"


class SiteKey(StrEnum):
    """Keys of the ``site`` ``ConfigRecord`` in every reply."""

    #: The site's pseudonym from its config (``SiteConfig.name``).
    NAME = "name"
    #: The device the site computed on: ``cpu``, or ``cuda:N`` and the GPU's model name
    #: (:data:`SITE_DEVICE_PATTERN`; nothing that identifies the machine). Optional: a site
    #: of an older version sends none.
    DEVICE = "device"


class TrainMetric(StrEnum):
    """Fixed schema of a ``train`` reply's ``MetricRecord``."""

    #: Training images (not batches): the FedAvg weight.
    NUM_EXAMPLES = "num-examples"
    #: Mean loss of the last local epoch.
    LOSS = "train.loss"
    #: Local epochs run.
    EPOCHS = "train.epochs"
    #: Seconds of local compute inside the handler.
    SECONDS = "train.seconds"
    #: Seconds from the ClientApp process's start to the handler (Flower starts one process
    #: per message; imports dominate).
    STARTUP = "train.startup-seconds"
    #: Files the site's data pipeline skipped this run (counted, never named).
    QUARANTINED = "data.quarantined"
    #: Privacy spent so far at this site (0 without DP).
    DP_EPSILON = "dp.epsilon"
    #: 1 when local training ended collapsed (loss at ln 2, embeddings nearly identical;
    #: :attr:`sic_core.training.TrainHistory.collapsed`), else 0. The server rejects it.
    COLLAPSED = "train.collapsed"


class SupportMetric(StrEnum):
    """Fixed schema of a ``query.support`` reply's ``MetricRecord``."""

    NUM_EXAMPLES = "num-examples"
    #: Classes present in the site's training split.
    CLASSES_PRESENT = "support.classes-present"
    SECONDS = "support.seconds"
    STARTUP = "support.startup-seconds"


class CalibrationMetric(StrEnum):
    """Fixed schema of a ``query.calibration`` reply's ``MetricRecord``."""

    #: Validation images binned.
    NUM_EXAMPLES = "num-examples"
    SECONDS = "calibration.seconds"
    STARTUP = "calibration.startup-seconds"


class EvalMetric(StrEnum):
    """Fixed schema of an ``evaluate`` reply's ``MetricRecord``."""

    #: Validation images.
    NUM_EXAMPLES = "num-examples"
    #: BCE loss on the validation split (site-local supports).
    LOSS = "val.loss"
    #: AUROC (binary, or macro one-vs-rest); meaningful only if ``AUROC_DEFINED`` is 1.
    AUROC = "val.auroc"
    #: 1 if the validation split holds both outcomes of at least one class, else 0.
    AUROC_DEFINED = "val.auroc-defined"
    BALANCED_ACCURACY = "val.balanced-accuracy"
    ACCURACY = "val.accuracy"
    #: AUROC of the global support vectors themselves (no local substitution).
    AUROC_GLOBAL_SUPPORT = "val.auroc-global-support"
    #: Support vectors replaced by a real local image (classes absent here keep the global).
    LOCAL_SUPPORTS = "val.local-supports"
    #: Expected calibration error over 15 bins, of the calibrated probabilities.
    ECE = "val.ece"
    #: The same of the raw probabilities (sigmoids normalised over classes).
    ECE_RAW = "val.ece-raw"
    #: 95 % interval of ``AUROC``; ``nan`` where the small-cell rule withholds it.
    AUROC_CI_LOW = "val.auroc-ci-low"
    AUROC_CI_HIGH = "val.auroc-ci-high"
    SECONDS = "val.seconds"
    STARTUP = "val.startup-seconds"
    #: Seconds of the explanation-quality metrics and the report (part of ``SECONDS``).
    XAI_SECONDS = "xai.seconds"


class XaiMetric(StrEnum):
    """Explanation-quality metrics of an ``evaluate`` reply (METRICS.md; also the MLflow keys).

    ``nan`` means "does not apply at this site this round" (no lesion masks, no marker, first
    round for stability); every other value is finite.
    """

    COMPLETENESS = "xai/completeness_max_rel_err"
    EVIDENCE_CONCENTRATION = "xai/evidence_concentration"
    GINI = "xai/gini"
    TOP_SUPPORT_AGREEMENT = "xai/top_support_agreement"
    RMA_LIFT = "xai/rma_lift"
    POINTING_GAME = "xai/pointing_game"
    POINTING_GAME_BASELINE = "xai/pointing_game_baseline"
    ARTIFACT_MASS_LIFT = "xai/artifact_mass_lift"
    MARKER_COUNTERFACTUAL_SHIFT = "xai/marker_counterfactual_shift"
    MARKER_COUNTERFACTUAL_FLIPS = "xai/marker_counterfactual_flips"
    DELETION_AUC = "xai/deletion_auc"
    INSERTION_AUC = "xai/insertion_auc"
    DELETION_RANDOM_GAP = "xai/deletion_random_gap"
    INSERTION_RANDOM_GAP = "xai/insertion_random_gap"
    MAX_SENSITIVITY = "xai/max_sensitivity"
    DP_NOISE_RANK_CORR = "xai/dp_noise_rank_corr"
    DRIFT_TO_GLOBAL = "xai/drift_to_global"


class WhyMetric(StrEnum):
    """Mean "why similar" influence per property over a site's gallery supports (the MLflow
    keys; :mod:`sic_core.why_similar`): signed, normalised so the five magnitudes sum to 1."""

    INTENSITY = "why/intensity"
    CONTRAST = "why/contrast"
    TEXTURE = "why/texture"
    SHAPE = "why/shape"
    POSITION = "why/position"


def support_jaccard_key(class_index: int) -> str:
    """``xai/support_jaccard/c<class>``: this round's vs last round's support image ids."""
    return f"xai/support_jaccard/c{class_index}"


def xai_metric_keys(num_classes: int) -> frozenset[str]:
    """Every explanation-quality key an ``evaluate`` reply carries for ``num_classes``."""
    return frozenset(XaiMetric) | {support_jaccard_key(c) for c in range(num_classes)}


def eval_metric_keys(num_classes: int) -> frozenset[str]:
    """The full metric schema of an ``evaluate`` reply."""
    return EVAL_METRIC_KEYS | xai_metric_keys(num_classes) | frozenset(WhyMetric)


def eval_nan_allowed_keys(num_classes: int) -> frozenset[str]:
    """Keys of an ``evaluate`` reply that may be ``nan`` ("does not apply" or withheld)."""
    return (
        xai_metric_keys(num_classes)
        | frozenset(WhyMetric)
        | {str(EvalMetric.AUROC_CI_LOW), str(EvalMetric.AUROC_CI_HIGH)}
    )


#: State-dict entries that never travel in ``arrays`` (the support set has its own record).
SUPPORT_BUFFER_KEYS: frozenset[str] = frozenset({"support_vectors", "support_labels"})

TRAIN_METRIC_KEYS: frozenset[str] = frozenset(TrainMetric)
SUPPORT_METRIC_KEYS: frozenset[str] = frozenset(SupportMetric)
CALIBRATION_METRIC_KEYS: frozenset[str] = frozenset(CalibrationMetric)
EVAL_METRIC_KEYS: frozenset[str] = frozenset(EvalMetric)


class ErrorReason(StrEnum):
    """Fixed failure codes a site may send instead of a reply.

    ``SicfedError.reason`` codes (``config_error``, ``data_error``, ``decode_error``, ...) are
    sent as they are; anything else becomes :attr:`INTERNAL_ERROR`.
    """

    CONFIG_ERROR = "config_error"
    DATA_ERROR = "data_error"
    PRIVACY_BUDGET_EXHAUSTED = "privacy_budget_exhausted"
    SITE_ERROR = "site_error"
    #: The message the site received was malformed (missing record, wrong shapes).
    INVALID_MESSAGE = "invalid_message"
    #: Any exception that is not a ``SicfedError``; details stay in the site's log.
    INTERNAL_ERROR = "internal_error"


#: What a reason code looks like: a short snake_case token that cannot carry free text.
ERROR_REASON_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,47}")

#: What a site pseudonym looks like (the same rule as ``SiteConfig.name``).
SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

#: What a site's device label looks like (:attr:`SiteKey.DEVICE`): ``cpu`` or ``cuda:N``
#: followed by the GPU's model name in a fixed alphabet, e.g. ``cuda:0 NVIDIA H100 80GB HBM3``.
SITE_DEVICE_PATTERN = re.compile(r"cpu|cuda:[0-9]{1,2}( [A-Za-z0-9 ._()-]{1,64})?")


def is_error_reason(value: str) -> bool:
    """True if ``value`` is a well-formed reason code (see :data:`ERROR_REASON_PATTERN`)."""
    return ERROR_REASON_PATTERN.fullmatch(value) is not None


def format_error(reason: str, site: str | None) -> str:
    """The text of a site's error reply: ``"<reason>@<site>"`` (or ``"<reason>"``).

    A failing site names itself (its pseudonym may leave the site) so that the server can
    attribute the failure even before the site has sent any valid reply.

    Raises
    ------
    ValueError
        If ``reason`` is not a reason code or ``site`` not a site pseudonym.
    """
    if not is_error_reason(reason):
        raise ValueError(f"not a reason code: {reason!r}")
    if site is None:
        return reason
    if SITE_NAME_PATTERN.fullmatch(site) is None:
        raise ValueError(f"not a site pseudonym: {site!r}")
    return f"{reason}@{site}"


def parse_error(text: str) -> tuple[str, str | None] | None:
    """Split an error reply's text into ``(reason, site)``; ``None`` if it is not ours."""
    reason, _, site = text.partition("@")
    if not is_error_reason(reason):
        return None
    if not site:
        return reason, None
    if SITE_NAME_PATTERN.fullmatch(site) is None:
        return None
    return reason, site
