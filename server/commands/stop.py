"""``python -m server stop``: stop the processes ``start`` launched."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.audit import actor_here
from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator
from server.processes import pid_alive, stop_pid_group
from server.run_watch import reconcile_runs

__all__ = ["stop"]

console = Console()


def stop(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    keep_mlflow: Annotated[
        bool,
        typer.Option(
            "--keep-mlflow",
            help="Stop only the SuperLink; MLflow keeps running and the next `start` reuses it.",
        ),
    ] = False,
) -> None:
    """Stop the coordinator's SuperLink and MLflow server (and everything they started).

    A run still going on is stopped with the SuperLink and marked killed (status.json, its
    MLflow runs and run_stopped in its audit log); one that a crash had already ended is
    marked failed (run_failed).

    Examples
    --------
    python -m server stop --home runs/coordinator
    python -m server stop --home runs/coordinator --keep-mlflow   # restart the SuperLink
    """
    coordinator = Coordinator(home)
    recorded = coordinator.recorded_processes()
    if not recorded:
        console.print(f"nothing to stop in {coordinator.home}")
        return
    # The SuperLink first: its runs are then marked killed while MLflow still answers.
    order = sorted(recorded, key=lambda name: name != "superlink")
    kept = {}
    for name in order:
        info = recorded[name]
        if keep_mlflow and name == "mlflow":
            kept[name] = info
            continue
        pid = int(info["pid"])
        was_running = pid_alive(pid)
        if was_running:
            stop_pid_group(pid)
            console.print(f"stopped {name} (pid {pid})")
        else:
            console.print(f"{name} (pid {pid}) was not running")
        if name == "superlink":
            # Runs of a SuperLink that had crashed before died of the crash, not of `stop`.
            for line in reconcile_runs(
                coordinator.home,
                superlink_alive=False,
                actor=actor_here(),
                stopped_by="server stop" if was_running else None,
            ):
                console.print(line)
    if kept:
        coordinator.pid_file.write_text(json.dumps(kept, indent=2))
        console.print(f"MLflow keeps running (pid {kept['mlflow']['pid']})")
        return
    coordinator.pid_file.unlink(missing_ok=True)
    coordinator.address_file.unlink(missing_ok=True)
