"""``python -m server status``: processes, connected sites and runs of a coordinator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.audit import actor_here
from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator
from server.flower_cli import connected_nodes, list_runs
from server.processes import pid_alive
from server.roster import Roster
from server.run_watch import reconcile_runs
from server.site_liveness import SiteHeartbeat, read_heartbeats
from sic_core.errors import SicfedError

__all__ = ["status"]

console = Console()


def _site_state(heartbeat: SiteHeartbeat | None) -> str:
    """``connected``, or ``lost`` with the age of the last heartbeat once one was missed."""
    if heartbeat is None or not heartbeat.lost:
        return "connected"
    return f"[red]lost[/] (no heartbeat for {heartbeat.seconds_since:.0f} s)"


def status(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
) -> None:
    """Show the coordinator's processes, the registered and connected sites, and the runs.

    A site that missed a heartbeat shows as lost (within 2 heartbeat periods, ~1 min, of
    its death). Runs that died without recording it (a crashed SuperLink or ServerApp)
    are marked failed here, in status.json, MLflow and the audit log (run_failed).

    Examples
    --------
    python -m server status --home runs/coordinator
    """
    coordinator = Coordinator(home)
    processes = Table(title=f"Coordinator {coordinator.home}")
    for column in ("process", "pid", "state", "log"):
        processes.add_column(column)
    recorded = coordinator.recorded_processes()
    for name, info in recorded.items():
        alive = pid_alive(int(info["pid"]))
        processes.add_row(
            name, str(info["pid"]), "running" if alive else "[red]stopped", info["log"]
        )
    console.print(processes)
    if not recorded:
        console.print("not started (python -m server start)")
        raise typer.Exit(1)
    superlink_alive = coordinator.superlink_alive()
    for line in reconcile_runs(
        coordinator.home, superlink_alive=superlink_alive, actor=actor_here()
    ):
        console.print(f"marked {line}", soft_wrap=True)
    if not superlink_alive:
        console.print(
            "[red]the SuperLink is not running[/]: restart it with `python -m server start "
            f"--home {home}` (MLflow is reused if it still runs), then `python -m server "
            "resume` to continue a run"
        )
        raise typer.Exit(1)
    try:
        nodes = connected_nodes(coordinator.flwr_home)
        runs = list_runs(coordinator.flwr_home)
    except SicfedError as error:
        console.print(f"[red]cannot reach the SuperLink:[/] {error}")
        raise typer.Exit(1) from None
    heartbeats = read_heartbeats(coordinator.superlink_db)
    sites = Table(title="Sites")
    for column in ("site", "state", "node id", "key fingerprint", "registered"):
        sites.add_column(column)
    online = {int(node["node-id"]) for node in nodes}
    registered = Roster(coordinator.roster_file).sites()
    for site in registered:
        state = (
            _site_state(heartbeats.get(site.node_id))
            if site.node_id in online
            else "registered, not connected"
        )
        sites.add_row(site.name, state, str(site.node_id), site.fingerprint, site.registered_at)
    for node_id in sorted(online - {site.node_id for site in registered}):
        state = _site_state(heartbeats.get(node_id))
        sites.add_row("(unregistered)", state, str(node_id), "-", "-")
    console.print(sites)
    lost = sum(1 for node_id in online if node_id in heartbeats and heartbeats[node_id].lost)
    console.print(f"connected sites (SuperNodes online): {len(nodes) - lost}, lost: {lost}")
    table = Table(title="Runs")
    for column in ("run id", "status", "elapsed s", "traffic MB", "client compute s"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            str(run["run-id"]),
            str(run["status"]),
            f"{float(run['elapsed']):.0f}",
            f"{run['network-traffic']['total-bytes'] / 1e6:.1f}",
            f"{run['compute-time']['clientapp-seconds']:.0f}",
        )
    console.print(table)
