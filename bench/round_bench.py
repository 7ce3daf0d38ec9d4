"""Federated round overhead: wall time per round minus the sites' local compute.

A real SuperLink and three SuperNodes on loopback run a small SIC federation (SynthCXR at
32 px, a few dozen images per site, one local epoch, no MLflow) twice: with the polling this
project tunes (SuperNode every 0.25 s, SuperExec every 0.1 s, ServerApp every 0.1 s) and with
Flower's defaults (3 s, 1 s). Per round

- ``site compute`` = the sum over the three phases (train, support, evaluate) of the slowest
  site's handler time;
- ``overhead`` = round wall time - site compute: everything the federation adds (Flower's
  polling and transport, one new ClientApp process per message and its imports, the
  server's validation, aggregation, support merge and checkpoint);
- ``clientapp startup`` = the part of it spent starting ClientApp processes (process start
  to handler, slowest site per phase).

Figures are medians over the rounds after the first (the first round also fetches the app
bundle at every site).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from server.commands.demo import ensure_synthcxr, wait_for_sites
from server.coordinator import (
    Coordinator,
    follow_run,
    free_port,
    start_site,
    start_superlink,
    submit,
)
from server.processes import ProcessGroup, ProcessStartError

__all__ = ["run"]

SITES = ("site_a", "site_b", "site_c")
ROUNDS = 4
PHASE_SECONDS = {"train": "train.seconds", "support": "support.seconds", "evaluate": "val.seconds"}
PHASE_STARTUP = {
    "train": "train.startup-seconds",
    "support": "support.startup-seconds",
    "evaluate": "val.startup-seconds",
}


def _federate(workdir: Path, data: Path, *, node_poll: float, server_poll: float) -> list[dict]:
    coordinator = Coordinator(workdir)
    with ProcessGroup() as group:
        address, _ = start_superlink(group, coordinator, port=free_port(8000))
        for index, name in enumerate(SITES):
            start_site(
                group,
                data / name / "site.yaml",
                name=name,
                superlink=address,
                port=free_port(9094 + index),
                log_path=coordinator.logs / f"{name}.log",
                poll_interval=node_poll,
                threads=1,
            )
        wait_for_sites(coordinator, len(SITES), timeout=300, group=group)
        overrides: dict[str, Any] = {
            "rounds": ROUNDS,
            "image-size": 32,
            "local-epochs": 1,
            "batch-size": 16,
            "min-sites": len(SITES),
            "poll-interval": server_poll,
        }
        run_id = submit(coordinator, overrides, staging_parent=workdir)
        outcome = follow_run(
            coordinator,
            run_id,
            run_dir=workdir,
            on_round=lambda _entry: None,
            timeout=1200,
            check=group.check_alive,
        )
    if outcome.status != "completed":
        raise ProcessStartError(f"benchmark run {run_id} ended {outcome.status}; see {workdir}")
    return outcome.rounds


def _slowest(entry: dict, phase: str, key: str) -> float:
    return max(row["metrics"][key] for row in entry["sites"][phase] if row["status"] == "ok")


def _figures(rounds: list[dict]) -> dict[str, float]:
    measured = rounds[1:] if len(rounds) > 1 else rounds
    walls = [entry["seconds"] for entry in measured]
    compute = [sum(_slowest(e, p, k) for p, k in PHASE_SECONDS.items()) for e in measured]
    startup = [sum(_slowest(e, p, k) for p, k in PHASE_STARTUP.items()) for e in measured]
    overhead = [wall - work for wall, work in zip(walls, compute, strict=True)]
    return {
        "round_wall_s": statistics.median(walls),
        "site_compute_s": statistics.median(compute),
        "round_overhead_s": statistics.median(overhead),
        "clientapp_startup_s": statistics.median(startup),
        "flower_overhead_s": statistics.median(
            o - s for o, s in zip(overhead, startup, strict=True)
        ),
    }


def run(workdir: Path) -> dict[str, float]:
    """Measure the round overhead with tuned and with Flower's default polling.

    Returns
    -------
    dict
        ``round_overhead_s`` (tuned) and its parts ``round_wall_s``, ``site_compute_s``,
        ``clientapp_startup_s``, ``flower_overhead_s``; the same with the suffix
        ``_flower_default`` for Flower's default polling.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sites"
    ensure_synthcxr(data, preset="easy", size=32, scale=0.1, seed=0, log_path=workdir / "synth.log")
    tuned = _figures(_federate(workdir / "tuned", data, node_poll=0.25, server_poll=0.1))
    default = _figures(_federate(workdir / "default", data, node_poll=3.0, server_poll=3.0))
    return {**tuned, **{f"{key}_flower_default": value for key, value in default.items()}}
