"""``python -m server stop``: stop the processes ``start`` launched."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator
from server.processes import pid_alive, stop_pid_group

__all__ = ["stop"]

console = Console()


def stop(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
) -> None:
    """Stop the coordinator's SuperLink and MLflow server (and everything they started).

    Examples
    --------
    python -m server stop --home runs/coordinator
    """
    coordinator = Coordinator(home)
    recorded = coordinator.recorded_processes()
    if not recorded:
        console.print(f"nothing to stop in {coordinator.home}")
        return
    for name, info in recorded.items():
        pid = int(info["pid"])
        if pid_alive(pid):
            stop_pid_group(pid)
            console.print(f"stopped {name} (pid {pid})")
        else:
            console.print(f"{name} (pid {pid}) was not running")
    coordinator.pid_file.unlink(missing_ok=True)
    coordinator.address_file.unlink(missing_ok=True)
