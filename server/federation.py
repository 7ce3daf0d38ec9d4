"""The round loop of a SIC federation: train, support, evaluate, checkpoint, track.

The first global support set is given (the public, seeded class anchors). Each round then

1. **train**: sampled sites train locally from the global weights and support set; replies
   are validated, attributed, sorted by site and aggregated by the strategy;
2. **support**: every connected site sends per-class cluster sums and counts under the new
   weights; the server merges them into the new global support vectors;
3. **evaluate**: sampled sites evaluate the global model with site-local supports;
4. **checkpoint**: weights, support set, strategy state, RNG state and MLflow run ids go to an
   atomic checkpoint; the round summary goes to ``rounds.jsonl`` and to MLflow.

A site that fails, times out or sends an invalid reply is logged against its name and the
round completes with the others. Waiting for sites is bounded everywhere.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from server.checkpoint import RunFiles
from server.messaging import exchange
from server.strategy import Phase, PhaseReport, SicStrategy
from server.tracking import MlflowTracker
from sic_core.errors import SicfedError
from sic_core.wire import EvalMetric

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
                        "metrics": o.metrics,
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


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def run_federation(
    grid: Grid,
    strategy: SicStrategy,
    *,
    initial_arrays: ArrayRecord,
    num_rounds: int,
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
        Rounds to run.
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
    for server_round in range(1, num_rounds + 1):
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
        replies = send(
            list(
                strategy.configure_evaluate(
                    server_round, arrays, ConfigRecord(dict(evaluate_config)), grid
                )
            )
        )
        eval_metrics = strategy.aggregate_evaluate(server_round, replies)
        seconds = time.monotonic() - started
        summary = RoundSummary(
            server_round=server_round,
            seconds=seconds,
            reports=tuple(
                strategy.reports[phase] for phase in (Phase.TRAIN, Phase.SUPPORT, Phase.EVALUATE)
            ),
            summary=_round_summary(strategy, train_metrics, eval_metrics, seconds),
        )
        result.arrays = arrays
        result.rounds.append(summary)
        if tracker is not None:
            tracker.log_round(server_round, summary.reports, summary.summary)
        if files is not None:
            support = strategy.support
            files.write_checkpoint(
                server_round,
                {
                    "arrays": {k: torch.from_numpy(a.numpy().copy()) for k, a in arrays.items()},
                    "support_vectors": support.vectors if support is not None else None,
                    "support_labels": support.labels if support is not None else None,
                    "aggregator": type(strategy.aggregator).__name__,
                    "aggregator_state": strategy.aggregator_state(),
                    "sites": sites.names,
                    "rng": _rng_state(),
                    "mlflow": {
                        "parent_run_id": tracker.parent_run_id if tracker else "",
                        "site_run_ids": dict(tracker.site_run_ids) if tracker else {},
                    },
                    **(checkpoint_extra or {}),
                },
            )
            files.append_round(summary.to_json())
        log.info(
            "round %d done in %.1f s: mean site AUROC %s",
            server_round,
            seconds,
            f"{summary.summary['perf/mean_site_auroc']:.3f}"
            if "perf/mean_site_auroc" in summary.summary
            else "n/a",
        )
    return result
