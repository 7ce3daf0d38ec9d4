"""The round loop of a SIC federation: train, support, evaluate, checkpoint, track.

The first global support set is given (the public, seeded class anchors). Each round then

1. **train**: sampled sites train locally from the global weights and support set; replies
   are validated, attributed, sorted by site and aggregated by the strategy;
2. **support**: every connected site sends per-class cluster sums and counts under the new
   weights; the server merges them into the new global support vectors;
3. **evaluate**: sampled sites evaluate the global model with site-local supports;
4. **checkpoint**: weights, support set, strategy state, RNG state and MLflow run ids go to an
   atomic checkpoint; the round summary goes to ``rounds.jsonl`` and to MLflow;
5. **reports**: the sites' round reports, with outlier flags and cross-site context
   (:mod:`server.reports`), go to ``runs/<run id>/reports/`` and to MLflow, together with the
   federation summary.

A site that fails, times out or sends an invalid reply is logged against its name and the
round completes with the others. Waiting for sites is bounded everywhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from server.audit import AuditEvent, AuditLog, actor_here, arrays_sha256, file_sha256
from server.checkpoint import RunFiles, capture_rng_state
from server.messaging import exchange
from server.reports import (
    federation_summary,
    outlier_flags,
    with_site_context,
    write_federation_summary,
    write_site_reports,
)
from server.strategy import Phase, PhaseReport, SicStrategy
from server.tracking import MlflowTracker, site_metric_name
from sic_core.errors import SicfedError
from sic_core.report import json_safe
from sic_core.wire import EvalMetric, TrainMetric

__all__ = ["FederationError", "FederationResult", "RoundSummary", "run_federation"]

log = logging.getLogger(__name__)


class FederationError(SicfedError):
    """The federation cannot continue (e.g. no site answered the first support query)."""

    reason = "federation_failed"


@dataclass(frozen=True)
class RoundSummary:
    """One finished round: per-phase reports and the cross-site summary."""

    server_round: int
    seconds: float
    reports: tuple[PhaseReport, ...]
    summary: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``rounds.jsonl`` holds)."""
        return {
            "round": self.server_round,
            "seconds": round(self.seconds, 3),
            "summary": self.summary,
            "sites": {
                report.phase: [
                    {
                        "site": o.site,
                        "status": o.status,
                        "reason": o.reason,
                        "metrics": json_safe(o.metrics),
                    }
                    for o in report.outcomes
                ]
                for report in self.reports
            },
        }


@dataclass
class FederationResult:
    """Final global weights and support set, plus every round's summary."""

    arrays: ArrayRecord
    rounds: list[RoundSummary] = field(default_factory=list)


def _round_summary(
    strategy: SicStrategy,
    train_metrics: MetricRecord | None,
    eval_metrics: MetricRecord | None,
    seconds: float,
) -> dict[str, float]:
    summary: dict[str, float] = {"time/round_s": seconds}
    for phase in (Phase.TRAIN, Phase.SUPPORT, Phase.EVALUATE):
        report = strategy.reports.get(phase)
        if report is not None:
            summary[f"fed/{phase}_sites_ok"] = float(len(report.ok))
            summary[f"fed/{phase}_sites_failed"] = float(len(report.problems))
    summary["fed/train_sites_clipped"] = float(len(strategy.clipped))
    if train_metrics is not None and "train.loss" in train_metrics:
        summary["train/loss"] = float(train_metrics["train.loss"])
    if eval_metrics is not None:
        for key, name in (
            ("sites.mean-auroc", "perf/mean_site_auroc"),
            ("sites.min-auroc", "perf/min_site_auroc"),
            (str(EvalMetric.AUROC), "perf/auroc_weighted"),
            (str(EvalMetric.BALANCED_ACCURACY), "perf/balanced_accuracy_weighted"),
            (str(EvalMetric.LOSS), "perf/loss_weighted"),
        ):
            if key in eval_metrics:
                summary[name] = float(eval_metrics[key])
    return summary


@dataclass
class ExplanationRecord:
    """Every evaluated round's per-site values, flags and reports (for cross-site context)."""

    run: str
    values: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    flags: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    reports: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def add_round(self, server_round: int, report: PhaseReport) -> dict[str, dict[str, int]]:
        """Record the accepted evaluations of a round; return the sites' outlier flags."""
        self.values[server_round] = {
            o.site: {
                name: value
                for key, value in o.metrics.items()
                if (name := site_metric_name(Phase.EVALUATE, key)) is not None
            }
            for o in report.ok
        }
        flags = outlier_flags(self.values[server_round])
        self.flags[server_round] = flags
        self.reports[server_round] = {
            o.site: with_site_context(o.report, o.site, self.values, flags[o.site])
            for o in report.ok
            if o.report is not None
        }
        return flags

    def write(self, server_round: int, directory: Path, tracker: MlflowTracker | None) -> None:
        """Write the round's site reports and the federation summary; log them to MLflow."""
        folders = write_site_reports(directory, server_round, self.reports[server_round])
        summary = write_federation_summary(
            directory, federation_summary(self.run, self.values, self.flags)
        )
        if tracker is not None:
            for site, folder in folders.items():
                tracker.log_site_report(site, server_round, folder)
            tracker.log_federation_summary(summary)


def _round_audit(
    strategy: SicStrategy, server_round: int, arrays: ArrayRecord, files: RunFiles
) -> dict[str, Any]:
    """The ``round_completed`` audit details (README, "Audit log")."""
    reports = [strategy.reports[p] for p in (Phase.TRAIN, Phase.SUPPORT, Phase.EVALUATE)]
    checkpoint = files.checkpoint_path(server_round)
    return {
        "round": server_round,
        "participants": {r.phase: [o.site for o in r.ok] for r in reports},
        "rejected": [
            {"phase": r.phase, "site": o.site, "status": o.status, "reason": o.reason}
            for r in reports
            for o in r.problems
        ],
        "clipped": [
            {"site": site, "norm": norm, "bound": bound}
            for site, (norm, bound) in sorted(strategy.clipped.items())
        ],
        "dp_epsilon": {
            o.site: o.metrics[str(TrainMetric.DP_EPSILON)] for o in strategy.reports[Phase.TRAIN].ok
        },
        "model_hash": arrays_sha256(arrays),
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_sha256(checkpoint),
    }


def run_federation(
    grid: Grid,
    strategy: SicStrategy,
    *,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    first_round: int = 1,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    timeout: float,
    poll_interval: float = 0.2,
    files: RunFiles | None = None,
    tracker: MlflowTracker | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> FederationResult:
    """Run ``num_rounds`` SIC rounds on ``grid``.

    Parameters
    ----------
    grid
        The ServerApp's grid (or a test double).
    strategy
        The SIC strategy (aggregation, validation, support merge), with its initial
        support set.
    initial_arrays
        Initial global weights (support buffers excluded).
    num_rounds
        The run's last round.
    first_round
        The round to start with (a resumed run starts after its last complete round).
    train_config, evaluate_config
        Round settings sent to sites (``server-round`` is added per round).
    timeout
        Seconds to wait for replies in each phase.
    poll_interval
        Seconds between polls for replies.
    files
        Where checkpoints, ``rounds.jsonl`` and ``status.json`` go (``None``: nowhere).
    tracker
        MLflow tracker (``None``: no tracking).
    checkpoint_extra
        Plain data stored in every checkpoint (model config, run settings).

    Raises
    ------
    FederationError
        If the strategy has no initial support set.
    """
    sites = strategy.sites

    def send(messages: list) -> list:
        result = exchange(grid, messages, sites=sites, timeout=timeout, poll_interval=poll_interval)
        return result.replies

    if strategy.support is None:
        raise FederationError("the strategy needs an initial support set (e.g. the anchors)")
    arrays = initial_arrays
    result = FederationResult(arrays=arrays)
    explanations = ExplanationRecord(run=f"fed-{files.run_id}" if files else "federation")
    for server_round in range(first_round, num_rounds + 1):
        started = time.monotonic()
        log.info("[ROUND %d/%d]", server_round, num_rounds)
        train_round = ConfigRecord(dict(train_config))
        replies = send(list(strategy.configure_train(server_round, arrays, train_round, grid)))
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        support_round = ConfigRecord(dict(evaluate_config))
        replies = send(strategy.configure_support(server_round, arrays, support_round, grid))
        strategy.aggregate_support(server_round, replies)
        calibration_round = ConfigRecord(dict(evaluate_config))
        replies = send(
            strategy.configure_calibration(server_round, arrays, calibration_round, grid)
        )
        strategy.aggregate_calibration(server_round, replies)
        replies = send(
            list(
                strategy.configure_evaluate(
                    server_round, arrays, ConfigRecord(dict(evaluate_config)), grid
                )
            )
        )
        eval_metrics = strategy.aggregate_evaluate(server_round, replies)
        flags = explanations.add_round(server_round, strategy.reports[Phase.EVALUATE])
        seconds = time.monotonic() - started
        summary = RoundSummary(
            server_round=server_round,
            seconds=seconds,
            reports=tuple(
                strategy.reports[phase] for phase in (Phase.TRAIN, Phase.SUPPORT, Phase.EVALUATE)
            ),
            summary={
                **_round_summary(strategy, train_metrics, eval_metrics, seconds),
                "fed/flagged_sites": float(sum(any(f.values()) for f in flags.values())),
            },
        )
        result.arrays = arrays
        result.rounds.append(summary)
        if tracker is not None:
            tracker.log_round(server_round, summary.reports, summary.summary, flags)
        if files is not None:
            explanations.write(server_round, files.reports_dir, tracker)
        if files is not None:
            support = strategy.support
            files.write_checkpoint(
                server_round,
                {
                    "arrays": {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()},
                    "support_vectors": support.vectors if support is not None else None,
                    "support_labels": support.labels if support is not None else None,
                    "calibration": (
                        strategy.calibration.to_dict() if strategy.calibration else None
                    ),
                    "aggregator": type(strategy.aggregator).__name__,
                    "aggregator_state": strategy.aggregator_state(),
                    "update_norm_history": (
                        strategy.update_bound.history if strategy.update_bound else []
                    ),
                    "sites": sites.names,
                    "rng": capture_rng_state(),
                    "mlflow": {
                        "parent_run_id": tracker.parent_run_id if tracker else "",
                        "site_run_ids": dict(tracker.site_run_ids) if tracker else {},
                    },
                    **(checkpoint_extra or {}),
                },
            )
            files.append_round(summary.to_json())
            AuditLog(files.audit_path, files.run_id).append(
                AuditEvent.ROUND_COMPLETED,
                actor=actor_here("serverapp"),
                details=_round_audit(strategy, server_round, arrays, files),
            )
        log.info(
            "round %d done in %.1f s: mean site AUROC %s",
            server_round,
            seconds,
            f"{summary.summary['perf/mean_site_auroc']:.3f}"
            if "perf/mean_site_auroc" in summary.summary
            else "n/a",
        )
    return result
