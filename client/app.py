"""Flower ClientApp of sicfed (``clientapp = "client.app:app"`` in pyproject.toml).

A site runs this for every message (Flower starts a fresh process per message, so the site's
data come from the on-disk cache of :func:`client.data.load_site_data`):

- ``train``: local SIC training from the global weights (DP-SGD against the global support
  set when the run or the site's config asks for DP); replies with the weights (B-cos
  filters at unit length) and one fixed-schema ``MetricRecord`` (:class:`TrainMetric`);
- ``query.support``: per-class cluster sums and counts of the site's training embeddings
  under the global weights (:class:`SupportMetric`; under DP the noised release around the
  global support set);
- ``query.calibration``: binned validation margins under the new global support set (integer
  counts, :class:`CalibrationMetric`), from which the server fits the round's calibration;
- ``evaluate``: global weights and support set, site-local nearest-image supports, AUROC
  with its 95 % interval, balanced accuracy, calibrated and raw ECE and loss on the
  validation split (:class:`EvalMetric`),
  the explanation-quality metrics on the site's audit set (:class:`XaiMetric`), and the
  round report (:mod:`client.round_report`): the full copy stays in the site's state
  folder, the redacted one (or the full one, where sharing is allowed) goes to the server.

Where ``python -m client join`` started a site worker (:mod:`client.site_worker`, on by
default for a GPU site), each handler forwards its message to it, and the worker does the
same work with the device initialised and the data decoded once per join; without one
(tests, simulation, a CPU site by default) the work runs in this process.

Every handler computes on the site's ``compute.device`` (:mod:`client.device`): the model
is built there, the cached images stay in host memory and move to it batch by batch, and
everything that goes on the wire is copied back to the CPU first.

Every reply names the site (its pseudonym and its device label, :attr:`SiteKey.DEVICE`) in a
``site`` record. The :func:`sanitise_errors`
mod turns any failure into a fixed reason code; the full error stays in the site's log.
Per-site memory across rounds (rounds trained, last local supports) lives in
``context.state``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.config import SiteConfig, load_site_config
from client.data import SiteData, load_site_data, training_augmentation
from client.device import device_label, site_device
from client.mods import sanitise_errors
from client.privacy.central import central_dp_clipping
from client.privacy.ledger import PrivacyLedger
from client.round_report import RoundFacts, audit_and_report, round_report_dir
from client.site_worker import forward_to_worker
from client.training import (
    ModelSpec,
    RoundSettings,
    build_model,
    calibration_statistics,
    config_value,
    evaluate_locally,
    private_support_statistics,
    support_from_record,
    support_statistics,
    train_locally,
    train_privately,
    weights_record,
)
from sic_core import SICModel, SupportSet
from sic_core.calibration import Calibration
from sic_core.errors import ConfigError, SiteError
from sic_core.wire import (
    ArrayKey,
    CalibrationMetric,
    ConfigKey,
    ErrorReason,
    EvalMetric,
    QueryName,
    RecordKey,
    ReportKey,
    SiteKey,
    SupportMetric,
    TrainMetric,
    XaiMetric,
)

__all__ = [
    "HANDLERS",
    "SITE_CONFIG_KEY",
    "Received",
    "SiteResources",
    "app",
    "calibration_at_site",
    "evaluate_at_site",
    "site_config_path",
    "support_at_site",
    "train_at_site",
]

log = logging.getLogger(__name__)

#: The ``--node-config`` key that points a SuperNode at its site YAML.
SITE_CONFIG_KEY = "site-config"
#: ``context.state`` records kept across rounds at the site.
STATE_PROGRESS = "sicfed.progress"
STATE_LOCAL_SUPPORT = "sicfed.local-support"

app = ClientApp(mods=[sanitise_errors])


def process_age() -> float:
    """Seconds since this process started (Linux ``/proc``; 0.0 where unavailable)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return max(0.0, uptime - started)


def _route_logs() -> None:
    """Show this app's INFO logs in the SuperNode's console (Flower's handler)."""
    flower = logging.getLogger("flwr")
    for name in ("client", "sic_core"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in flower.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)


@dataclass(frozen=True)
class Received:
    """What a handler reads of a message: its records and its type (for error texts)."""

    content: RecordDict
    message_type: str


@dataclass
class SiteResources:
    """What a handler computes with: the site's config, its device and its data.

    In a ClientApp process these are loaded for one message (:meth:`load`); the site worker
    (:mod:`client.site_worker`) keeps one for the whole ``join``, so that the device is
    initialised and the data decoded once.
    """

    config: SiteConfig
    config_path: str
    device: torch.device
    _data: SiteData | None = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str) -> SiteResources:
        """The site's config (``ConfigError`` naming the field) and its resolved device."""
        config = load_site_config(Path(path))
        return cls(config=config, config_path=path, device=site_device(config))

    def data(self) -> SiteData:
        """The site's data (loaded from its cache on first use)."""
        if self._data is None:
            self._data = load_site_data(self.config)
        return self._data


def site_config_path(context: Context) -> str:
    """``context.node_config["site-config"]``: the site's YAML (``ConfigError`` if unset)."""
    path = context.node_config.get(SITE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            f"the SuperNode has no {SITE_CONFIG_KEY!r} in its node config; start it with "
            f"--node-config '{SITE_CONFIG_KEY}=\"/path/to/site.yaml\"' "
            "(python -m client join --site FILE does this)"
        )
    return path


def _record(message: Received, key: RecordKey, kind: type) -> object:
    record = message.content.get(str(key))
    if not isinstance(record, kind):
        raise SiteError(
            f"the {message.message_type} message has no {str(key)!r} {kind.__name__}",
            reason=str(ErrorReason.INVALID_MESSAGE),
        )
    return record


def _reply(site: SiteResources, metrics: dict[str, float], **records) -> RecordDict:
    named = ConfigRecord(
        {str(SiteKey.NAME): site.config.name, str(SiteKey.DEVICE): device_label(site.device)}
    )
    return RecordDict(
        {
            **{str(key): value for key, value in records.items()},
            str(RecordKey.METRICS): MetricRecord(metrics),
            str(RecordKey.SITE): named,
        }
    )


def _progress(context: Context) -> ConfigRecord:
    record = context.state.get(STATE_PROGRESS)
    if not isinstance(record, ConfigRecord):
        record = ConfigRecord({"rounds-trained": 0, "last-train-round": 0, "last-eval-round": 0})
        context.state[STATE_PROGRESS] = record
    return record


def uses_dp(requested: bool, config: SiteConfig) -> bool:
    """DP applies if the run asks for it or the site's own config enables it."""
    return requested or config.privacy.enabled


def _ledger(config: SiteConfig) -> PrivacyLedger:
    return PrivacyLedger.in_state_dir(
        Path(config.state_dir),
        delta=config.privacy.target_delta,
        max_epsilon=config.privacy.max_epsilon,
    )


def _spec(message: Received, config: SiteConfig, source: str) -> tuple[ConfigRecord, ModelSpec]:
    round_config = _record(message, RecordKey.CONFIG, ConfigRecord)
    spec = ModelSpec.from_config(round_config)
    spec.check_site(
        image_size=config.data.image_size, class_names=config.data.class_names, source=source
    )
    return round_config, spec


def _handle(kind: str, message: Message, context: Context) -> Message:
    """Run handler ``kind`` on the site worker if ``join`` started one, else here."""
    startup = process_age()
    _route_logs()
    received = Received(message.content, message.metadata.message_type)
    content = forward_to_worker(kind, received, context, startup)
    if content is None:
        site = SiteResources.load(site_config_path(context))
        content = HANDLERS[kind](received, context, site, startup)
    return Message(content, reply_to=message)


@app.train(mods=[central_dp_clipping])
def train(message: Message, context: Context) -> Message:
    """Train the global model locally for the configured epochs."""
    return _handle("train", message, context)


@app.query(str(QueryName.SUPPORT))
def support(message: Message, context: Context) -> Message:
    """Per-class cluster sums and counts of the training embeddings under the sent weights."""
    return _handle("support", message, context)


@app.query(str(QueryName.CALIBRATION))
def calibrate(message: Message, context: Context) -> Message:
    """Binned validation margins under the sent weights and global support set."""
    return _handle("calibration", message, context)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global model with site-local supports; audit its explanations; report."""
    return _handle("evaluate", message, context)


def train_at_site(
    message: Received, context: Context, site: SiteResources, startup: float
) -> RecordDict:
    """The ``train`` reply's records: local training from the global weights."""
    started = time.perf_counter()
    config, device = site.config, site.device
    round_config, spec = _spec(message, config, site.config_path)
    settings = RoundSettings.from_config(round_config)
    if "batch_size" in config.training.model_fields_set:
        settings = replace(settings, batch_size=config.training.batch_size)
    support = support_from_record(_record(message, RecordKey.SUPPORT, ArrayRecord), spec)
    model = build_model(
        spec, _record(message, RecordKey.ARRAYS, ArrayRecord), support, device=device
    )
    data = site.data()
    split = data.split("train")
    augmentation = training_augmentation(config)
    augment = (lambda batch, _: augmentation(batch, {})[0]) if augmentation.enabled else None
    epsilon = 0.0
    if uses_dp(settings.dp, config):
        history, epsilon = train_privately(
            model,
            split.images,
            split.labels,
            settings,
            support,
            privacy=config.privacy,
            ledger=_ledger(config),
            run_id=str(context.run_id),
            augment=augment,
        )
    else:
        history = train_locally(model, split.images, split.labels, settings, augment=augment)
    weights = weights_record(model)
    progress = _progress(context)
    progress["rounds-trained"] = int(progress["rounds-trained"]) + 1
    progress["last-train-round"] = settings.server_round
    log.info(
        "site %s round %d: trained %d epochs on %d images, loss %.4f",
        config.name,
        settings.server_round,
        settings.local_epochs,
        history.num_examples,
        history.final_loss,
    )
    metrics = {
        str(TrainMetric.NUM_EXAMPLES): history.num_examples,
        str(TrainMetric.LOSS): float(history.final_loss),
        str(TrainMetric.EPOCHS): len(history.epochs),
        str(TrainMetric.SECONDS): time.perf_counter() - started,
        str(TrainMetric.STARTUP): startup,
        str(TrainMetric.QUARANTINED): int(sum(data.quarantine_counts.values())),
        str(TrainMetric.DP_EPSILON): epsilon,
        str(TrainMetric.COLLAPSED): int(history.collapsed),
    }
    return _reply(site, metrics, **{str(RecordKey.ARRAYS): weights})


def support_at_site(
    message: Received, context: Context, site: SiteResources, startup: float
) -> RecordDict:
    """The ``query.support`` reply's records: the training embeddings' cluster statistics."""
    started = time.perf_counter()
    config, device = site.config, site.device
    round_config, spec = _spec(message, config, site.config_path)
    model = build_model(spec, _record(message, RecordKey.ARRAYS, ArrayRecord), None, device=device)
    split = site.data().split("train")
    seed = int(config_value(round_config, ConfigKey.SEED, int))
    if uses_dp(bool(config_value(round_config, ConfigKey.DP, bool)), config):
        stats = private_support_statistics(
            model,
            split.images,
            split.labels,
            support_from_record(_record(message, RecordKey.SUPPORT, ArrayRecord), spec),
            privacy=config.privacy,
            ledger=_ledger(config),
            run_id=str(context.run_id),
            server_round=int(config_value(round_config, ConfigKey.SERVER_ROUND, int)),
            seed=seed,
        )
    else:
        stats = support_statistics(model, split.images, split.labels, seed=seed)
    present = int((split.labels.bincount(minlength=spec.num_classes) > 0).sum())
    metrics = {
        str(SupportMetric.NUM_EXAMPLES): int(split.labels.shape[0]),
        str(SupportMetric.CLASSES_PRESENT): present,
        str(SupportMetric.SECONDS): time.perf_counter() - started,
        str(SupportMetric.STARTUP): startup,
    }
    record = ArrayRecord(
        {
            str(ArrayKey.SUMS): Array(stats.sums.float().numpy()),
            str(ArrayKey.COUNTS): Array(stats.counts.float().numpy()),
        }
    )
    return _reply(site, metrics, **{str(RecordKey.STATS): record})


def _global_model(
    message: Received, site: SiteResources
) -> tuple[ConfigRecord, ModelSpec, SupportSet, SICModel]:
    """The round's config and model spec, the global support set, and the global model with
    that support set, built on the site's device."""
    round_config, spec = _spec(message, site.config, site.config_path)
    global_support = support_from_record(_record(message, RecordKey.SUPPORT, ArrayRecord), spec)
    model = build_model(
        spec, _record(message, RecordKey.ARRAYS, ArrayRecord), global_support, device=site.device
    )
    return round_config, spec, global_support, model


def calibration_at_site(
    message: Received, context: Context, site: SiteResources, startup: float
) -> RecordDict:
    """The ``query.calibration`` reply's records: integer counts of binned validation margins."""
    started = time.perf_counter()
    _, _, global_support, model = _global_model(message, site)
    data = site.data()
    train_split, val_split = data.split("train"), data.split("val")
    histogram = calibration_statistics(
        model,
        global_support,
        train_split.images,
        train_split.labels,
        val_split.images,
        val_split.labels,
    )
    metrics = {
        str(CalibrationMetric.NUM_EXAMPLES): histogram.cases,
        str(CalibrationMetric.SECONDS): time.perf_counter() - started,
        str(CalibrationMetric.STARTUP): startup,
    }
    record = ArrayRecord({str(ArrayKey.MARGIN_COUNTS): Array(histogram.counts.cpu().numpy())})
    return _reply(site, metrics, **{str(RecordKey.STATS): record})


def round_calibration(round_config: ConfigRecord, num_classes: int) -> Calibration | None:
    """The round's global calibration from an ``evaluate`` config (``None``: none sent)."""
    text = round_config.get(str(ConfigKey.CALIBRATION))
    if text is None:
        return None
    try:
        calibration = Calibration.from_dict(json.loads(str(text)))
    except (ValueError, TypeError) as error:
        raise SiteError(
            f"round config {str(ConfigKey.CALIBRATION)!r}: {error}",
            reason=str(ErrorReason.INVALID_MESSAGE),
        ) from None
    if calibration.num_classes != num_classes:
        raise SiteError(
            f"round config {str(ConfigKey.CALIBRATION)!r} has {calibration.num_classes} "
            f"classes, the model {num_classes}",
            reason=str(ErrorReason.INVALID_MESSAGE),
        )
    return calibration


def _ci_bound(result_intervals: dict | None, index: int) -> float:
    interval = (result_intervals or {}).get("perf/auroc")
    return math.nan if interval is None else interval.to_list()[index]


def evaluate_at_site(
    message: Received, context: Context, site: SiteResources, startup: float
) -> RecordDict:
    """The ``evaluate`` reply's records: validation metrics, the audit and the report."""
    started = time.perf_counter()
    config = site.config
    round_config, spec, global_support, model = _global_model(message, site)
    server_round = int(config_value(round_config, ConfigKey.SERVER_ROUND, int))
    data = site.data()
    train_split, val_split = data.split("train"), data.split("val")
    calibration = round_calibration(round_config, spec.num_classes)
    result = evaluate_locally(
        model,
        global_support,
        train_split.images,
        train_split.labels,
        val_split.images,
        val_split.labels,
        calibration=calibration,
    )
    local = result.local_support
    context.state[STATE_LOCAL_SUPPORT] = ArrayRecord(
        {"indices": Array(local.indices.numpy()), "labels": Array(local.labels.numpy())}
    )
    progress = _progress(context)
    progress["last-eval-round"] = server_round
    metrics: dict[str, float] = {
        str(EvalMetric.NUM_EXAMPLES): result.num_examples,
        str(EvalMetric.LOSS): result.loss,
        str(EvalMetric.AUROC): _finite_or_chance(result.auroc),
        str(EvalMetric.AUROC_DEFINED): int(result.auroc_defined),
        str(EvalMetric.BALANCED_ACCURACY): result.balanced_accuracy,
        str(EvalMetric.ACCURACY): result.accuracy,
        str(EvalMetric.AUROC_GLOBAL_SUPPORT): _finite_or_chance(result.auroc_global_support),
        str(EvalMetric.LOCAL_SUPPORTS): int((local.indices >= 0).sum()),
        str(EvalMetric.ECE): _finite_or_zero(result.expected_calibration_error),
        str(EvalMetric.ECE_RAW): _finite_or_zero(result.expected_calibration_error_raw),
        str(EvalMetric.AUROC_CI_LOW): _ci_bound(result.intervals, 0),
        str(EvalMetric.AUROC_CI_HIGH): _ci_bound(result.intervals, 1),
    }
    audit_started = time.perf_counter()
    dp_epsilon = _ledger(config).epsilon
    facts = RoundFacts(
        run_id=str(context.run_id),
        server_round=server_round,
        config_path=Path(site.config_path),
        performance={
            "perf/auroc": result.auroc,
            "perf/auroc_global_support": result.auroc_global_support,
            "perf/balanced_accuracy": result.balanced_accuracy,
            "perf/accuracy": result.accuracy,
            "perf/loss": result.loss,
            "perf/ece": result.expected_calibration_error,
            "perf/ece_raw": result.expected_calibration_error_raw,
        },
        intervals=result.intervals or {},
        calibration=calibration,
        reliability=result.reliability,
        reliability_raw=result.reliability_raw or [],
        dp_epsilon=dp_epsilon,
        dp_delta=config.privacy.target_delta,
        released=[
            ("validation metrics (val.*)", len(metrics)),
            ("explanation-quality metrics (xai/*)", "see section 5"),
            ("this report", "redacted" if not config.reporting.share_example_images else "full"),
            ("privacy spent so far (epsilon)", round(dp_epsilon, 4)),
        ],
    )
    xai, report = audit_and_report(config, data, model, global_support, local.indices, facts)
    metrics.update(xai)
    metrics[str(EvalMetric.XAI_SECONDS)] = time.perf_counter() - audit_started
    metrics[str(EvalMetric.SECONDS)] = time.perf_counter() - started
    metrics[str(EvalMetric.STARTUP)] = startup
    log.info(
        "site %s round %d: val AUROC %.3f, balanced accuracy %.3f, completeness error %.2g; "
        "report in %s",
        config.name,
        server_round,
        result.auroc,
        result.balanced_accuracy,
        xai[str(XaiMetric.COMPLETENESS)],
        round_report_dir(config, server_round),
    )
    report_record = ConfigRecord({str(ReportKey.JSON): json.dumps(report, allow_nan=False)})
    return _reply(site, metrics, **{str(RecordKey.REPORT): report_record})


#: The handlers' work by message kind (what the site worker runs for a forwarded message).
HANDLERS = {
    "train": train_at_site,
    "support": support_at_site,
    "calibration": calibration_at_site,
    "evaluate": evaluate_at_site,
}


def _finite_or_chance(value: float) -> float:
    """AUROC for the wire: undefined (``nan``) travels as 0.5 with ``val.auroc-defined = 0``."""
    return value if math.isfinite(value) else 0.5


def _finite_or_zero(value: float) -> float:
    """ECE for the wire: ``nan`` (no validation images) cannot happen after the empty check."""
    return value if math.isfinite(value) else 0.0
