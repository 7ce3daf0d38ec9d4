"""Site-local work of one federated round, on tensors (no Flower types beyond records).

The ClientApp (:mod:`client.app`) turns messages into calls of these functions:

- :func:`build_model` rebuilds the global model from the message's weights and support set;
- :func:`train_locally` runs SIC training (:func:`sic_core.training.train_sic`) from the
  global weights, with FedProx's proximal term when the server asks for it;
- :func:`train_privately` does the same with DP-SGD (Opacus) against fixed supports (the
  public anchors in anchor rounds, the global support set afterwards), with the noise
  fixed or set from a per-round ε target, checking and recording the site's privacy ledger;
- :func:`support_statistics` computes per-class cluster sums and counts of the site's
  training embeddings (:func:`private_support_statistics`: the DP release);
- :func:`calibration_statistics` bins the validation margins under the site-local supports
  (the statistics of the federated calibration fit, :mod:`sic_core.calibration`);
- :func:`evaluate_locally` swaps each global support vector for the site's nearest real
  training image (the reference's "closest" rule, applied locally) and scores the site's
  validation split, with calibrated probabilities and 95 % intervals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import Tensor

from client.config import PrivacyConfig
from client.privacy.dp_sgd import plan_dp_sgd, train_dp_sgd, validate_for_dp
from client.privacy.ledger import Mechanism, PrivacyLedger, noise_for_epsilon
from client.privacy.support_release import plan_support_release, private_cluster_statistics
from sic_core import SICModel, anchor_support, create_model, unit_filter_state_dict
from sic_core.calibration import (
    Calibration,
    MarginHistogram,
    calibrated_probabilities,
    margin_histogram,
    raw_probabilities,
)
from sic_core.errors import ConfigError, SiteError
from sic_core.head import sic_loss
from sic_core.metrics import (
    Interval,
    auroc,
    auroc_interval,
    balanced_accuracy,
    bootstrap_interval,
    expected_calibration_error,
    reliability_bins,
)
from sic_core.support import (
    ClusterStatistics,
    SupportSet,
    cluster_statistics,
    embed_all,
    nearest_local_support,
)
from sic_core.training import Augment, TrainConfig, TrainHistory, train_sic
from sic_core.wire import SUPPORT_BUFFER_KEYS, ArrayKey, ConfigKey, ErrorReason

__all__ = [
    "EvalResult",
    "ModelSpec",
    "RoundSettings",
    "build_model",
    "calibration_statistics",
    "config_value",
    "evaluate_locally",
    "plan_private_round",
    "private_support_statistics",
    "support_from_record",
    "support_statistics",
    "train_locally",
    "train_privately",
    "weights_record",
]

log = logging.getLogger(__name__)

#: Confidence bins of every ECE (``sic_core.metrics.expected_calibration_error``'s default).
ECE_BINS = 15


def _invalid(message: str) -> SiteError:
    return SiteError(message, reason=str(ErrorReason.INVALID_MESSAGE))


def config_value(config: ConfigRecord, key: ConfigKey, kind: type) -> object:
    """``config[key]`` checked to be of ``kind`` (``SiteError`` ``invalid_message`` if not)."""
    if str(key) not in config:
        raise _invalid(f"round config lacks {str(key)!r}")
    value = config[str(key)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _invalid(f"round config {str(key)!r}: expected {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """The global model's architecture, as every message's config states it."""

    encoder: str
    num_classes: int
    n_shot: int
    proj_dim: int
    image_size: int

    @classmethod
    def from_config(cls, config: ConfigRecord) -> ModelSpec:
        """Read the model keys of a round config (``SiteError`` if one is missing)."""
        return cls(
            encoder=str(config_value(config, ConfigKey.ENCODER, str)),
            num_classes=int(config_value(config, ConfigKey.NUM_CLASSES, int)),
            n_shot=int(config_value(config, ConfigKey.N_SHOT, int)),
            proj_dim=int(config_value(config, ConfigKey.PROJ_DIM, int)),
            image_size=int(config_value(config, ConfigKey.IMAGE_SIZE, int)),
        )

    def check_site(self, *, image_size: int, class_names: list[str], source: str) -> None:
        """Raise ``ConfigError`` if the site's data cannot feed this model."""
        if image_size != self.image_size:
            raise ConfigError(
                f"{source}: data.image_size is {image_size} but the federation's model "
                f"expects image-size {self.image_size}"
            )
        if len(class_names) != self.num_classes:
            raise ConfigError(
                f"{source}: data.class_names has {len(class_names)} classes but the "
                f"federation's model has num-classes {self.num_classes}"
            )


@dataclass(frozen=True)
class RoundSettings:
    """Local training settings of one round (from the ``train`` message's config)."""

    server_round: int
    local_epochs: int
    lr: float
    batch_size: int
    seed: int
    anchor_rounds: int = 1
    proximal_mu: float = 0.0
    dp: bool = False

    @classmethod
    def from_config(cls, config: ConfigRecord) -> RoundSettings:
        """Read a ``train`` round config (``SiteError`` if a key is missing or mistyped)."""
        proximal = config.get(str(ConfigKey.PROXIMAL_MU), 0.0)
        if not isinstance(proximal, int | float) or isinstance(proximal, bool):
            raise _invalid(f"round config {str(ConfigKey.PROXIMAL_MU)!r} is not a number")
        return cls(
            server_round=int(config_value(config, ConfigKey.SERVER_ROUND, int)),
            local_epochs=int(config_value(config, ConfigKey.LOCAL_EPOCHS, int)),
            lr=float(config_value(config, ConfigKey.LR, float)),
            batch_size=int(config_value(config, ConfigKey.BATCH_SIZE, int)),
            seed=int(config_value(config, ConfigKey.SEED, int)),
            anchor_rounds=int(config_value(config, ConfigKey.ANCHOR_ROUNDS, int)),
            proximal_mu=float(proximal),
            dp=bool(config_value(config, ConfigKey.DP, bool)),
        )


def support_from_record(record: ArrayRecord, spec: ModelSpec) -> SupportSet:
    """The global support set of a ``support`` record, checked against the model spec."""
    if str(ArrayKey.VECTORS) not in record or str(ArrayKey.LABELS) not in record:
        raise _invalid("support record lacks vectors or labels")
    vectors = torch.from_numpy(record[str(ArrayKey.VECTORS)].numpy().copy()).float()
    labels = torch.from_numpy(record[str(ArrayKey.LABELS)].numpy().copy()).long()
    expected = spec.num_classes * spec.n_shot
    if vectors.shape != (expected, spec.proj_dim) or labels.shape != (expected,):
        raise _invalid(
            f"support record: expected vectors ({expected}, {spec.proj_dim}) and labels "
            f"({expected},), got {tuple(vectors.shape)} and {tuple(labels.shape)}"
        )
    if not torch.isfinite(vectors).all():
        raise _invalid("support record holds NaN or Inf")
    return SupportSet(vectors=vectors, labels=labels, indices=torch.full_like(labels, -1))


def build_model(
    spec: ModelSpec,
    arrays: ArrayRecord,
    support: SupportSet | None,
    *,
    device: torch.device | None = None,
) -> SICModel:
    """The global model: architecture from ``spec``, weights from ``arrays``, on ``device``.

    Everything that computes with the model (training, embedding, evaluation, the audit)
    runs on the device the model is on (default: the CPU) and moves its batches there.

    Raises
    ------
    SiteError
        (``invalid_message``) if the weights do not match the architecture.
    """
    model = create_model(
        spec.encoder,
        in_channels=1,
        num_classes=spec.num_classes,
        n_shot=spec.n_shot,
        proj_dim=spec.proj_dim,
    )
    expected = set(model.state_dict()) - SUPPORT_BUFFER_KEYS
    if set(arrays.keys()) != expected:
        missing = sorted(expected - set(arrays.keys()))[:5]
        extra = sorted(set(arrays.keys()) - expected)[:5]
        raise _invalid(f"weights do not match the model: missing {missing}, unexpected {extra}")
    state = {key: torch.from_numpy(arrays[key].numpy().copy()) for key in expected}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise _invalid(f"weights do not fit the model: {error}") from None
    if device is not None:
        model.to(device)
    if support is not None:
        model.set_support(support.vectors, support.labels)
    return model


def weights_record(model: SICModel) -> ArrayRecord:
    """The model's weights for the server: B-cos filters at unit length, no support buffers."""
    state = unit_filter_state_dict(model)
    for key, value in state.items():
        if torch.is_floating_point(value) and not torch.isfinite(value).all():
            raise SiteError(f"local training produced non-finite weights in {key}")
    return ArrayRecord(
        {
            key: Array(value.cpu().numpy())
            for key, value in state.items()
            if key not in SUPPORT_BUFFER_KEYS
        }
    )


@contextmanager
def proximal_term(model: SICModel, mu: float) -> Iterator[None]:
    """FedProx: add ``mu * (w - w_global)`` to every parameter's gradient while active.

    That is the gradient of ``mu / 2 * ||w - w_global||^2`` with ``w_global`` the weights
    at entry; hooks are removed on exit (also after an exception).
    """
    if mu <= 0:
        yield
        return
    handles = []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        anchor = parameter.detach().clone()

        def hook(grad: Tensor, parameter: Tensor = parameter, anchor: Tensor = anchor) -> Tensor:
            return grad + mu * (parameter.detach() - anchor)

        handles.append(parameter.register_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_locally(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    settings: RoundSettings,
    *,
    augment: Augment | None = None,
) -> TrainHistory:
    """Train the global model on this site's training split for one round (no DP).

    Parameters
    ----------
    model
        The global model (trained in place).
    images, labels
        ``(N, 1, S, S)`` float32 in ``[0, 1]`` and ``(N,)`` int64 training data.
    settings
        Round settings from the server.
    augment
        ``augment(batch, generator) -> batch`` applied to query images (the site's
        training augmentation), or ``None``.

    Notes
    -----
    In the first ``settings.anchor_rounds`` rounds every local epoch trains against the
    public class anchors (:func:`run_anchors`), identical at every site and in every round
    and the ones the server evaluates with, which spreads the embeddings of a randomly
    initialised encoder. Later rounds follow :func:`sic_core.train_sic`'s recipe against
    the same anchors: an epoch trains episodically (with the anchored term) when the
    global model's embeddings separate this site's classes, against the anchors alone
    otherwise. Each round's schedule has no warm-up (the global model is already warm after
    round 1). A collapsed result is logged here and flagged in the reply's
    ``train.collapsed`` metric.
    """
    if images.shape[0] == 0:
        raise SiteError("the training split is empty", reason="no_training_data")
    config = TrainConfig(
        epochs=settings.local_epochs,
        lr=settings.lr,
        warmup_epochs=0.0,
        batch_size=settings.batch_size,
        seed=settings.seed + settings.server_round,
    )
    anchors = run_anchors(model, settings)
    anchored = settings.server_round <= settings.anchor_rounds
    with proximal_term(model, settings.proximal_mu):
        history = train_sic(
            model,
            images,
            labels,
            config,
            augment=augment,
            fixed_support=anchors if anchored else None,
            anchors=anchors,
            finalize_support=False,
        )
    if history.collapsed:
        log.warning(
            "local training collapsed (loss %.4f at ln 2, mean embedding cosine %.3f); "
            "the server leaves this update out",
            history.final_loss,
            history.final_mean_cosine,
        )
    if not math.isfinite(history.final_loss):
        raise SiteError("local training diverged (non-finite loss)", reason="training_diverged")
    return history


def run_anchors(model: SICModel, settings: RoundSettings) -> SupportSet:
    """The run's public class anchors: seeded by the run seed, so every site trains against
    the anchors the server evaluates with and the public warm start was trained on (a
    per-round seed would move the target every round)."""
    return anchor_support(
        model.num_classes, model.n_shot, model.config.proj_dim, seed=settings.seed
    )


def _dp_train_config(settings: RoundSettings) -> TrainConfig:
    return TrainConfig(
        epochs=settings.local_epochs,
        lr=settings.lr,
        warmup_epochs=0.0,
        batch_size=settings.batch_size,
        seed=settings.seed + settings.server_round,
    )


def plan_private_round(
    num_images: int,
    settings: RoundSettings,
    *,
    privacy: PrivacyConfig,
    delta: float,
    run_id: str,
) -> tuple[Mechanism, Mechanism | None]:
    """The round's DP-SGD mechanism and its support release (``None`` in anchor rounds).

    In the first ``settings.anchor_rounds`` rounds of a DP run the server keeps the public
    anchors as the global support set and asks for no support release, so the round is
    DP-SGD alone. The DP-SGD noise multiplier is ``privacy.noise_multiplier``, or, with
    ``privacy.epsilon_per_round``, the one that makes the round (DP-SGD composed with the
    support release, if any, on their own) cost that ε at ``delta``
    (:func:`client.privacy.ledger.noise_for_epsilon`). Should a server ask for a release
    anyway, it is checked against the budget and recorded like any other.
    """
    config = _dp_train_config(settings)
    support_plan = None
    if settings.server_round > settings.anchor_rounds:
        support_plan = plan_support_release(
            noise_multiplier=privacy.support_noise_multiplier,
            run_id=run_id,
            round_=settings.server_round,
        )
    sigma = privacy.noise_multiplier
    if privacy.epsilon_per_round is not None:
        shape = plan_dp_sgd(
            num_images, config, noise_multiplier=1.0, run_id=run_id, round_=settings.server_round
        )
        sigma = noise_for_epsilon(
            privacy.epsilon_per_round,
            delta=delta,
            sample_rate=shape.sample_rate,
            steps=shape.steps,
            alongside=[support_plan] if support_plan is not None else [],
        )
    sgd_plan = plan_dp_sgd(
        num_images, config, noise_multiplier=sigma, run_id=run_id, round_=settings.server_round
    )
    return sgd_plan, support_plan


def train_privately(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    settings: RoundSettings,
    global_support: SupportSet,
    *,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    run_id: str,
    augment: Augment | None = None,
) -> tuple[TrainHistory, float]:
    """One round of DP-SGD against fixed supports; return history and ε spent so far.

    The supports are the public class anchors in the first ``settings.anchor_rounds``
    rounds (as in :func:`train_locally`; they cost no privacy) and the global support set
    (itself a DP release) afterwards. Before training, the whole round (this DP-SGD and the
    support release that follows it after the anchor rounds, :func:`plan_private_round`) is
    checked against the site's budget (``PrivacyBudgetError``, code
    ``privacy_budget_exhausted``, if it would exceed ``privacy.max_epsilon``); the DP-SGD
    mechanism is recorded in the ledger after training, before anything trained leaves the
    site.
    """
    if images.shape[0] == 0:
        raise SiteError("the training split is empty", reason="no_training_data")
    config = _dp_train_config(settings)
    plan, support_plan = plan_private_round(
        int(images.shape[0]), settings, privacy=privacy, delta=ledger.delta, run_id=run_id
    )
    ledger.check_budget([plan] if support_plan is None else [plan, support_plan])
    supports = global_support
    if settings.server_round <= settings.anchor_rounds:
        supports = run_anchors(model, settings)
    validate_for_dp(model, supports)
    log.info(
        "DP-SGD round %d: noise multiplier %.3f, sample rate %.4f, %d steps",
        settings.server_round,
        plan.noise_multiplier,
        plan.sample_rate,
        plan.steps,
    )
    history = train_dp_sgd(
        model,
        images,
        labels,
        supports,
        config,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        augment=augment,
    )
    ledger.record([plan])
    if not math.isfinite(history.final_loss):
        raise SiteError("local training diverged (non-finite loss)", reason="training_diverged")
    return history, ledger.epsilon


def support_statistics(
    model: SICModel, images: Tensor, labels: Tensor, *, seed: int
) -> ClusterStatistics:
    """Per-class k-means cluster sums ``(C, n_shot, D)`` and counts ``(C, n_shot)``."""
    embeddings = embed_all(model, images)
    return cluster_statistics(embeddings, labels, model.num_classes, model.n_shot, seed=seed)


def private_support_statistics(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    global_support: SupportSet,
    *,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    run_id: str,
    server_round: int,
    seed: int,
) -> ClusterStatistics:
    """The DP support release: noised sums and counts around the global support vectors.

    Checked against the budget first and recorded in the ledger before it is returned.
    """
    plan = plan_support_release(
        noise_multiplier=privacy.support_noise_multiplier, run_id=run_id, round_=server_round
    )
    ledger.check_budget([plan])
    statistics = private_cluster_statistics(
        embed_all(model, images),
        labels,
        global_support,
        clip_norm=privacy.support_clip_norm,
        noise_multiplier=privacy.support_noise_multiplier,
        generator=torch.Generator().manual_seed(seed + server_round),
    )
    ledger.record([plan])
    return statistics


@dataclass(frozen=True)
class EvalResult:
    """Validation metrics of the global model at one site.

    AUROCs are ``nan`` when the split lacks an outcome (then ``auroc_defined`` is False).
    ``local_support`` holds the chosen training image per support vector (``-1``: none).
    ``expected_calibration_error`` and ``reliability`` are of the calibrated probabilities
    (the round's global calibration), the ``_raw`` ones of the sigmoids normalised over
    classes; ``intervals`` holds the 95 % interval of ``perf/auroc``,
    ``perf/auroc_global_support``, ``perf/balanced_accuracy`` and ``perf/ece`` (``None``:
    withheld, small cell).
    """

    num_examples: int
    loss: float
    auroc: float
    balanced_accuracy: float
    accuracy: float
    auroc_global_support: float
    local_support: SupportSet
    expected_calibration_error: float
    reliability: list[dict[str, float]]
    expected_calibration_error_raw: float = math.nan
    reliability_raw: list[dict[str, float]] | None = None
    intervals: dict[str, Interval | None] | None = None

    @property
    def auroc_defined(self) -> bool:
        return math.isfinite(self.auroc)


@torch.no_grad()
def _logits(model: SICModel, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits ``(N, C)`` on the CPU; each chunk of host images runs on the model's device."""
    model.eval()
    device = model.support_vectors.device
    return torch.cat([model(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


def _local_support(
    model: SICModel, global_support: SupportSet, train_images: Tensor, train_labels: Tensor
) -> SupportSet:
    """Each global support vector's nearest (by angle) training image of its class here."""
    embeddings = embed_all(model, train_images)
    return nearest_local_support(
        global_support.vectors, global_support.labels, embeddings, train_labels, by="angle"
    )


def calibration_statistics(
    model: SICModel,
    global_support: SupportSet,
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
) -> MarginHistogram:
    """Binned validation margins under the site-local supports (what the site sends).

    The logits are those :func:`evaluate_locally` scores; only integer counts per margin
    bin, class and outcome leave the site (:func:`sic_core.calibration.margin_histogram`).
    """
    if val_images.shape[0] == 0:
        raise SiteError("the validation split is empty", reason="no_validation_data")
    local = _local_support(model, global_support, train_images, train_labels)
    model.set_support(local.vectors, local.labels)
    return margin_histogram(_logits(model, val_images), val_labels)


def _balanced_accuracy_of(predicted: Tensor, labels: Tensor) -> Callable[[Tensor], float]:
    """:func:`balanced_accuracy` of resampled cases, vectorised for the bootstrap."""
    classes = int(labels.max()) + 1 if labels.numel() else 1
    correct = (predicted == labels).double()

    def statistic(index: Tensor) -> float:
        counts = torch.bincount(labels[index], minlength=classes).double()
        hits = torch.bincount(labels[index], weights=correct[index], minlength=classes)
        present = counts > 0
        return float((hits[present] / counts[present]).mean())

    return statistic


def _ece_of(probabilities: Tensor, labels: Tensor) -> Callable[[Tensor], float]:
    """:func:`expected_calibration_error` of resampled cases, vectorised for the bootstrap.

    Its bins: ``ECE = sum_b |sum_{i in b} (correct_i - confidence_i)| / N``.
    """
    normalised = probabilities.double() / probabilities.double().sum(dim=1, keepdim=True)
    confidence, predicted = normalised.max(dim=1)
    gap = (predicted == labels).double() - confidence
    edges = torch.linspace(0, 1, ECE_BINS + 1, dtype=torch.float64)
    bins = torch.bucketize(confidence, edges[1:-1], right=True)

    def statistic(index: Tensor) -> float:
        sums = torch.bincount(bins[index], weights=gap[index], minlength=ECE_BINS)
        return float(sums.abs().sum() / index.numel())

    return statistic


def evaluate_locally(
    model: SICModel,
    global_support: SupportSet,
    train_images: Tensor,
    train_labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    *,
    calibration: Calibration | None = None,
) -> EvalResult:
    """Score the global model on the validation split with site-local supports.

    Each global support vector is replaced by the embedding of the site's training image of
    its class that is nearest by angle (the model's similarity ignores a support's length,
    and DP-released global vectors, centroids of clipped embeddings, are far shorter than
    the embeddings; classes absent here keep the global vector); loss, AUROC and
    balanced accuracy use those supports. ``auroc_global_support`` scores the unmodified
    global vectors for comparison. Probabilities are calibrated with ``calibration`` (the
    round's global fit; without one they are the raw probabilities); the AUROC comes from
    the logits, so calibration, being monotone, leaves it unchanged.
    """
    if val_images.shape[0] == 0:
        raise SiteError("the validation split is empty", reason="no_validation_data")
    local = _local_support(model, global_support, train_images, train_labels)
    model.set_support(global_support.vectors, global_support.labels)
    global_logits = _logits(model, val_images)
    model.set_support(local.vectors, local.labels)
    logits = _logits(model, val_images)
    predicted = logits.argmax(dim=1)
    raw = raw_probabilities(logits)
    probabilities = raw if calibration is None else calibrated_probabilities(logits, calibration)
    intervals = {
        "perf/auroc": auroc_interval(logits, val_labels),
        "perf/auroc_global_support": auroc_interval(global_logits, val_labels),
        "perf/balanced_accuracy": bootstrap_interval(
            _balanced_accuracy_of(predicted, val_labels), val_labels
        ),
        "perf/ece": bootstrap_interval(_ece_of(probabilities, val_labels), val_labels),
    }
    return EvalResult(
        num_examples=int(val_images.shape[0]),
        loss=float(sic_loss(logits, val_labels)),
        auroc=auroc(logits, val_labels),
        balanced_accuracy=balanced_accuracy(predicted, val_labels),
        accuracy=float((predicted == val_labels).float().mean()),
        auroc_global_support=auroc(global_logits, val_labels),
        local_support=local,
        expected_calibration_error=expected_calibration_error(probabilities, val_labels),
        reliability=reliability_bins(probabilities, val_labels),
        expected_calibration_error_raw=expected_calibration_error(raw, val_labels),
        reliability_raw=reliability_bins(raw, val_labels),
        intervals=intervals,
    )
