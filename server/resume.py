"""Continuing a federation run after its last complete round (``python -m server resume``).

A round checkpoint (:meth:`server.checkpoint.RunFiles.write_checkpoint`) holds everything the
ServerApp changes from round to round: global weights, global support set, the
server-optimiser moments (FedAdam & co), the update-bound history, the site names, the
global RNG states and the MLflow run ids. A resumed ServerApp (run config ``resume-run`` =
the original run's id) restores all of it and runs the remaining rounds as a new Flower run,
writing into the original run's files, audit log and MLflow runs. Sites keep no state that
changes their training between rounds (their seeds derive from the run seed and the round),
so the final weights equal those of a run that never stopped.

A round is complete once its checkpoint is readable and its line is in ``rounds.jsonl``
(the checkpoint is written first, so a crash between the two leaves the round incomplete).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from server.checkpoint import CHECKPOINT_PATTERN, RunFiles, load_checkpoint, read_rounds
from server.settings import RunSettings
from server.sites import SiteDirectory
from server.strategy import SicStrategy, base_aggregator
from server.update_bound import UpdateNormBound
from sic_core.calibration import Calibration
from sic_core.errors import ConfigError
from sic_core.support import NO_INDEX, SupportSet

__all__ = [
    "ResumePoint",
    "find_resume_point",
    "restore_strategy",
    "resumed_settings",
    "round_arrays",
]


@dataclass(frozen=True)
class ResumePoint:
    """The last complete round of a run and its loaded checkpoint."""

    server_round: int
    checkpoint_path: Path
    state: dict[str, Any]


def find_resume_point(files: RunFiles) -> ResumePoint:
    """The run's last complete round (checkpoint readable and round logged).

    Raises
    ------
    ConfigError
        Naming the run's checkpoint folder when no round is complete.
    """
    logged = {int(entry["round"]) for entry in read_rounds(files.rounds_path)}
    for server_round in sorted(logged, reverse=True):
        path = files.checkpoint_path(server_round)
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path)
        except ConfigError:
            continue  # unreadable: an earlier round may still be complete
        return ResumePoint(server_round, path, state)
    pattern = CHECKPOINT_PATTERN.format(1).replace("001", "NNN")
    raise ConfigError(
        f"resume-run {files.run_id}: no complete round to resume from (no readable "
        f"{files.checkpoint_dir}/{pattern} whose round is in {files.rounds_path}); start a "
        "new run instead"
    )


def resumed_settings(point: ResumePoint, requested: RunSettings) -> RunSettings:
    """The original run's settings, with this submission's MLflow address and ``resume-run``.

    Everything that shapes the result (rounds, seed, strategy, model) comes from the
    checkpoint, so a resumed run cannot silently change course.
    """
    original = dict(point.state.get("run_config") or {})
    if not original:
        raise ConfigError(f"{point.checkpoint_path}: the checkpoint holds no run_config")
    original["resume-run"] = requested.resume_run
    original["run-dir"] = str(requested.resolved_run_dir())
    if requested.tracking_uri:
        original["tracking-uri"] = requested.tracking_uri
    return RunSettings.from_run_config(original)


def round_arrays(state: dict[str, Any]) -> ArrayRecord:
    """The global weights of a checkpoint as the ArrayRecord the next round sends."""
    return ArrayRecord({key: Array(value.numpy()) for key, value in state["arrays"].items()})


def restore_strategy(strategy: SicStrategy, state: dict[str, Any]) -> None:
    """Put the strategy back into its state after the checkpoint's round.

    Restores the global support set, the global calibration, the server-optimiser moments,
    the update-bound history and the node-to-site map.

    Raises
    ------
    ConfigError
        If the checkpoint was written by another aggregator than the run's.
    """
    aggregator = base_aggregator(strategy.aggregator)
    if state.get("aggregator") not in (None, type(strategy.aggregator).__name__):
        raise ConfigError(
            f"resume: the checkpoint's aggregator {state['aggregator']!r} is not the run's "
            f"{type(strategy.aggregator).__name__!r}"
        )
    if state.get("support_vectors") is not None:
        labels = torch.as_tensor(state["support_labels"]).long()
        strategy.support = SupportSet(
            vectors=torch.as_tensor(state["support_vectors"]).float(),
            labels=labels,
            indices=torch.full_like(labels, NO_INDEX),
        )
    if state.get("calibration"):
        strategy.calibration = Calibration.from_dict(state["calibration"])
    for name, moments in (state.get("aggregator_state") or {}).items():
        setattr(aggregator, name, {key: np.array(value.numpy()) for key, value in moments.items()})
    if strategy.update_bound is not None:
        strategy.update_bound = UpdateNormBound(
            strategy.update_bound.factor, history=state.get("update_norm_history") or []
        )
    strategy.sites = SiteDirectory({int(node): name for node, name in state["sites"].items()})
