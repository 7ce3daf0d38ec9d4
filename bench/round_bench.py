"""Federated round overhead: wall time per round minus the sites' local compute.

A real SuperLink and three SuperNodes on loopback run a small SIC federation (SynthCXR at
32 px, a few dozen images per site, one local epoch, no MLflow) twice: as this project runs
it (ClientApps forked from each site's warm launcher; SuperNode polling every 0.25 s,
SuperExecs every 0.1 s, ServerApp every 0.1 s) and as Flower runs by default (a fresh
ClientApp process per message; SuperNode 3 s, SuperExec 1 s, Grid 3 s). Per round

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

import yaml

from client.commands.join import FLOWER_POLL_SECONDS
from server.app_bundle import app_bundle_hash
from server.commands.demo import ensure_synthcxr, wait_for_sites
from server.coordinator import (
    TASK_POLL_INTERVAL,
    Coordinator,
    follow_run,
    free_port,
    start_site,
    start_superlink,
    submit,
)
from server.processes import ProcessGroup, ProcessStartError

__all__ = ["approve_app", "federate", "run", "slowest"]

SITES = ("site_a", "site_b", "site_c")
ROUNDS = 3
PHASE_SECONDS = {"train": "train.seconds", "support": "support.seconds", "evaluate": "val.seconds"}
PHASE_STARTUP = {
    "train": "train.startup-seconds",
    "support": "support.startup-seconds",
    "evaluate": "val.startup-seconds",
}


def federate(
    workdir: Path,
    data: Path,
    *,
    tuned: bool,
    settings: dict[str, Any] | None = None,
    worker: bool | None = None,
) -> list[dict]:
    """Run one federation of the three SynthCXR sites in ``data``; return its round log.

    ``settings`` override the run config of the overhead measurement (32 px, one epoch);
    ``worker`` starts every site with ``join --worker`` or ``--no-worker`` (``None``: join's
    default).
    """
    coordinator = Coordinator(workdir)
    task_poll = TASK_POLL_INTERVAL if tuned else None
    approve_app(data, app_bundle_hash(workdir / "staging"))
    with ProcessGroup() as group:
        address, _ = start_superlink(
            group, coordinator, port=free_port(8000), task_poll_interval=task_poll
        )
        for index, name in enumerate(SITES):
            start_site(
                group,
                data / name / "site.yaml",
                name=name,
                superlink=address,
                port=free_port(9094 + index),
                log_path=coordinator.logs / f"{name}.log",
                poll_interval=0.25 if tuned else FLOWER_POLL_SECONDS,
                threads=1,
                warm=tuned,
                task_poll_interval=task_poll,
                worker=worker,
            )
        wait_for_sites(coordinator, len(SITES), timeout=300, group=group)
        overrides: dict[str, Any] = {
            "rounds": ROUNDS,
            "image-size": 32,
            "local-epochs": 1,
            "batch-size": 16,
            "min-sites": len(SITES),
            "poll-interval": 0.1 if tuned else FLOWER_POLL_SECONDS,
            **(settings or {}),
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


def approve_app(data: Path, app_hash: str) -> None:
    """Let every site in ``data`` run exactly the app bundle ``app_hash`` (and no other)."""
    for name in SITES:
        site_yaml = data / name / "site.yaml"
        config = yaml.safe_load(site_yaml.read_text())
        config["federation"] = {"approved_apps": [app_hash]}
        site_yaml.write_text(yaml.safe_dump(config, sort_keys=False))


def slowest(entry: dict, phase: str, key: str) -> float:
    """The largest value of metric ``key`` among the sites that answered ``phase``."""
    return max(row["metrics"][key] for row in entry["sites"][phase] if row["status"] == "ok")


def _figures(rounds: list[dict]) -> dict[str, float]:
    measured = rounds[1:] if len(rounds) > 1 else rounds
    walls = [entry["seconds"] for entry in measured]
    compute = [sum(slowest(e, p, k) for p, k in PHASE_SECONDS.items()) for e in measured]
    startup = [sum(slowest(e, p, k) for p, k in PHASE_STARTUP.items()) for e in measured]
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
    """Measure the round overhead as sicfed runs and as Flower runs by default.

    Returns
    -------
    dict
        ``round_overhead_s`` (tuned) and its parts ``round_wall_s``, ``site_compute_s``,
        ``clientapp_startup_s``, ``flower_overhead_s``; the same with the suffix
        ``_flower_default`` for Flower's defaults (cold ClientApps, default polling).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sites"
    ensure_synthcxr(data, preset="easy", size=32, scale=0.1, seed=0, log_path=workdir / "synth.log")
    tuned = _figures(federate(workdir / "tuned", data, tuned=True))
    default = _figures(federate(workdir / "default", data, tuned=False))
    return {**tuned, **{f"{key}_flower_default": value for key, value in default.items()}}
