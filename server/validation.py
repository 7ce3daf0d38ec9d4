"""Checks every site reply must pass before it reaches an aggregate.

A reply is rejected (and logged against its site) when a record is missing, a metric key is
missing or extra, a value is NaN/Inf, an array has the wrong name, shape or dtype, a count is
negative, or a weight update is longer than the configured bound. Each check returns a fixed
reason code, never the offending values.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from sic_core.calibration import MARGIN_EDGES
from sic_core.wire import (
    CALIBRATION_METRIC_KEYS,
    SITE_NAME_PATTERN,
    SUPPORT_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    ArrayKey,
    CalibrationMetric,
    EvalMetric,
    RecordKey,
    ReportKey,
    SiteKey,
    SupportMetric,
    TrainMetric,
    eval_metric_keys,
    eval_nan_allowed_keys,
)

__all__ = [
    "Rejection",
    "check_calibration_reply",
    "check_eval_reply",
    "check_support_reply",
    "check_train_reply",
    "report_of",
]

#: Largest report a site may send (a shared report carries a few dozen small PNGs).
MAX_REPORT_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Rejection:
    """Why a reply was refused: a fixed ``reason`` code plus a detail for the server log."""

    reason: str
    detail: str


def _site_and_metrics(
    content: RecordDict,
    expected_keys: frozenset[str],
    count_key: str,
    nan_allowed: frozenset[str] = frozenset(),
) -> Rejection | None:
    site = content.get(str(RecordKey.SITE))
    if not isinstance(site, ConfigRecord):
        return Rejection("missing_site", "no 'site' ConfigRecord")
    name = site.get(str(SiteKey.NAME))
    if not isinstance(name, str) or SITE_NAME_PATTERN.fullmatch(name) is None:
        return Rejection("bad_site_name", "the site name is missing or malformed")
    if len(content.metric_records) != 1:
        return Rejection(
            "metric_records", f"expected one MetricRecord, got {len(content.metric_records)}"
        )
    metrics = content.get(str(RecordKey.METRICS))
    if not isinstance(metrics, MetricRecord):
        return Rejection("missing_metrics", "no 'metrics' MetricRecord")
    keys = set(metrics.keys())
    if keys != expected_keys:
        missing = sorted(expected_keys - keys)
        extra = sorted(keys - expected_keys)
        return Rejection(
            "metric_keys", f"metric keys differ: missing {missing}, unexpected {extra}"
        )
    for key, value in metrics.items():
        if isinstance(value, list | bool):
            return Rejection("metric_type", f"metric {key!r} is not a single number")
        if math.isnan(float(value)) and key in nan_allowed:
            continue
        if not math.isfinite(float(value)):
            return Rejection("non_finite", f"metric {key!r} is not finite")
    count = metrics[count_key]
    if float(count) < 1 or float(count) != int(count):
        return Rejection("bad_count", f"{count_key!r} must be a positive whole number")
    return None


def _arrays_match(
    record: object, expected: dict[str, tuple[tuple[int, ...], np.dtype]], name: str
) -> tuple[dict[str, np.ndarray] | None, Rejection | None]:
    if not isinstance(record, ArrayRecord):
        return None, Rejection("missing_arrays", f"no {name!r} ArrayRecord")
    if set(record.keys()) != set(expected):
        missing = sorted(set(expected) - set(record.keys()))
        extra = sorted(set(record.keys()) - set(expected))
        return None, Rejection(
            "array_keys", f"{name}: missing arrays {missing[:5]}, unexpected {extra[:5]}"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, (shape, dtype) in expected.items():
        value = record[key].numpy()
        if value.shape != shape or value.dtype != dtype:
            return None, Rejection(
                "array_shape",
                f"{name}.{key}: expected {shape} {dtype}, got {value.shape} {value.dtype}",
            )
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return None, Rejection("non_finite", f"{name}.{key} holds NaN or Inf")
        arrays[key] = value
    return arrays, None


def array_spec(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Names, shapes and dtypes of the arrays in ``record`` (what a reply must match)."""
    spec = {}
    for key, array in record.items():
        value = array.numpy()
        spec[key] = (value.shape, value.dtype)
    return spec


def check_train_reply(
    content: RecordDict, reference: ArrayRecord, *, max_update_norm: float = 0.0
) -> Rejection | None:
    """Check a ``train`` reply against the global weights it was trained from.

    Parameters
    ----------
    content
        The reply's records.
    reference
        The global weights sent to the site (names, shapes, dtypes; update origin).
    max_update_norm
        Reject an update whose global L2 norm ``||w_site - w_global||`` exceeds this
        (``0`` disables the bound).

    Returns
    -------
    Rejection or None
        ``None`` when the reply may be aggregated.
    """
    problem = _site_and_metrics(content, TRAIN_METRIC_KEYS, str(TrainMetric.NUM_EXAMPLES))
    if problem is not None:
        return problem
    if len(content.array_records) != 1:
        return Rejection(
            "array_records", f"expected one ArrayRecord, got {len(content.array_records)}"
        )
    metrics = content.get(str(RecordKey.METRICS))
    if isinstance(metrics, MetricRecord) and float(metrics[str(TrainMetric.COLLAPSED)]) > 0:
        # A collapsed model maps every image to one vector: averaging it in drags the
        # global model toward the same fixed point.
        return Rejection(
            "collapsed",
            f"local training collapsed (loss {float(metrics[str(TrainMetric.LOSS)]):.4f} "
            "at ln 2, embeddings nearly identical)",
        )
    arrays, problem = _arrays_match(
        content.get(str(RecordKey.ARRAYS)), array_spec(reference), str(RecordKey.ARRAYS)
    )
    if problem is not None:
        return problem
    if max_update_norm > 0 and arrays is not None:
        squared = 0.0
        for key, value in arrays.items():
            if np.issubdtype(value.dtype, np.floating):
                delta = value.astype(np.float64) - reference[key].numpy().astype(np.float64)
                squared += float(np.sum(delta * delta))
        if math.sqrt(squared) > max_update_norm:
            return Rejection(
                "update_norm",
                f"update norm {math.sqrt(squared):.4g} exceeds the bound {max_update_norm:.4g}",
            )
    return None


def check_support_reply(
    content: RecordDict, *, num_classes: int, n_shot: int, dim: int
) -> Rejection | None:
    """Check a ``query.support`` reply: per-class cluster sums ``(C, n_shot, D)`` and counts
    ``(C, n_shot)``, both float32 and finite.

    Counts may be fractional or negative (Gaussian noise under DP); the merge ignores
    clusters with fewer than one image.
    """
    problem = _site_and_metrics(content, SUPPORT_METRIC_KEYS, str(SupportMetric.NUM_EXAMPLES))
    if problem is not None:
        return problem
    expected = {
        str(ArrayKey.SUMS): ((num_classes, n_shot, dim), np.dtype(np.float32)),
        str(ArrayKey.COUNTS): ((num_classes, n_shot), np.dtype(np.float32)),
    }
    arrays, problem = _arrays_match(content.get(str(RecordKey.STATS)), expected, "stats")
    if problem is not None or arrays is None:
        return problem
    return None


def check_calibration_reply(content: RecordDict, *, num_classes: int) -> Rejection | None:
    """Check a ``query.calibration`` reply: binned margin counts ``(C, 2, bins)``, int64,
    non-negative, each class's bins adding up to the images binned."""
    problem = _site_and_metrics(
        content, CALIBRATION_METRIC_KEYS, str(CalibrationMetric.NUM_EXAMPLES)
    )
    if problem is not None:
        return problem
    bins = MARGIN_EDGES.numel() - 1
    expected = {str(ArrayKey.MARGIN_COUNTS): ((num_classes, 2, bins), np.dtype(np.int64))}
    arrays, problem = _arrays_match(content.get(str(RecordKey.STATS)), expected, "stats")
    if problem is not None or arrays is None:
        return problem
    counts = arrays[str(ArrayKey.MARGIN_COUNTS)]
    cases = int(content[str(RecordKey.METRICS)][str(CalibrationMetric.NUM_EXAMPLES)])
    if (counts < 0).any() or not (counts.sum(axis=(1, 2)) == cases).all():
        return Rejection("bad_counts", "margin counts are negative or do not add up")
    return None


def check_eval_reply(content: RecordDict, *, num_classes: int) -> Rejection | None:
    """Check an ``evaluate`` reply: fixed metric schema, rates in ``[0, 1]``, one report.

    Every ``val.*`` value must be finite; an explanation metric (``xai/*``) may be ``nan``
    ("does not apply at this site"), never infinite. The report must be one JSON object no
    larger than :data:`MAX_REPORT_BYTES` that names the replying site.
    """
    problem = _site_and_metrics(
        content,
        eval_metric_keys(num_classes),
        str(EvalMetric.NUM_EXAMPLES),
        nan_allowed=eval_nan_allowed_keys(num_classes),
    )
    if problem is not None:
        return problem
    metrics = content[str(RecordKey.METRICS)]
    for key in (
        EvalMetric.AUROC,
        EvalMetric.AUROC_GLOBAL_SUPPORT,
        EvalMetric.BALANCED_ACCURACY,
        EvalMetric.ACCURACY,
        EvalMetric.AUROC_DEFINED,
        EvalMetric.ECE,
    ):
        if not 0.0 <= float(metrics[str(key)]) <= 1.0:
            return Rejection("out_of_range", f"metric {str(key)!r} outside [0, 1]")
    report, problem = _report_of(content)
    if problem is not None:
        return problem
    site = content[str(RecordKey.SITE)][str(SiteKey.NAME)]
    if report is not None and report.get("provenance", {}).get("site") != site:
        return Rejection("bad_report", "the report names another site")
    return None


def _report_of(content: RecordDict) -> tuple[dict | None, Rejection | None]:
    record = content.get(str(RecordKey.REPORT))
    if not isinstance(record, ConfigRecord) or set(record.keys()) != {str(ReportKey.JSON)}:
        return None, Rejection("missing_report", "no 'report' ConfigRecord with one 'json' entry")
    text = record[str(ReportKey.JSON)]
    if not isinstance(text, str) or len(text) > MAX_REPORT_BYTES:
        return None, Rejection("bad_report", f"the report is not a string of <= {MAX_REPORT_BYTES}")
    try:
        report = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None, Rejection("bad_report", "the report is not strict JSON")
    if not isinstance(report, dict) or not isinstance(report.get("provenance"), dict):
        return None, Rejection("bad_report", "the report is not an object with a provenance")
    return report, None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def report_of(content: RecordDict) -> dict:
    """The report of an ``evaluate`` reply that passed :func:`check_eval_reply`."""
    report, problem = _report_of(content)
    if report is None:
        raise ValueError(problem.detail if problem else "no report")
    return report
