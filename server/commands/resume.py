"""``python -m server resume``: continue a run after its last complete round."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.audit import AuditEvent, AuditLog, actor_here
from server.checkpoint import RunFiles, read_status
from server.commands.run import follow_to_the_end
from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator, submit
from server.run_watch import reconcile_runs
from sic_core.errors import ConfigError, SicfedError

__all__ = ["latest_unfinished_run", "resume"]

console = Console()

#: ``status.json`` states a run can be resumed from.
RESUMABLE = ("failed", "killed")


def latest_unfinished_run(run_dir: Path) -> str:
    """The id of the run under ``run_dir`` that most recently ended failed or killed.

    Raises
    ------
    ConfigError
        If no run there ended that way.
    """
    candidates = [
        path
        for path in (Path(run_dir) / "runs").glob("*/status.json")
        if (read_status(path) or {}).get("status") in RESUMABLE
    ]
    if not candidates:
        raise ConfigError(f"{run_dir}/runs: no failed or killed run to resume")
    return max(candidates, key=lambda path: path.stat().st_mtime).parent.name


def resume(
    run_id: Annotated[
        str | None,
        typer.Argument(help="The run to continue (default: the last one that failed)."),
    ] = None,
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    follow: Annotated[bool, typer.Option(help="Stream progress until the run ends.")] = True,
    timeout: Annotated[
        float, typer.Option(help="Seconds to follow before stopping the run.")
    ] = 86400.0,
) -> None:
    """Continue a failed or killed run after its last complete round, as a new Flower run.

    The ServerApp restores the round's checkpoint (weights, support set, server-optimiser
    state, update-bound history, RNG state) and runs the remaining rounds with the original
    run config, writing into the original run's rounds.jsonl, checkpoints, audit log
    (event run_resumed) and MLflow parent and site runs. Sites need nothing beyond staying
    joined. Start the coordinator again first if it crashed.

    Examples
    --------
    python -m server start --home runs/coordinator   # after a crash; MLflow is reused
    python -m server resume --home runs/coordinator
    python -m server resume --home runs/coordinator 4242
    """
    from server.resume import find_resume_point  # torch and flwr: not for --help

    coordinator = Coordinator(home)
    if not coordinator.superlink_alive():
        console.print(
            f"[red]error:[/] the SuperLink of {coordinator.home} is not running: "
            f"`python -m server start --home {home}` first"
        )
        raise typer.Exit(1)
    for line in reconcile_runs(coordinator.home, superlink_alive=True):
        console.print(f"marked {line}", soft_wrap=True)
    try:
        chosen = run_id or latest_unfinished_run(coordinator.home)
        files = RunFiles(coordinator.home, chosen)
        status = read_status(files.status_path)
        if status is None:
            raise ConfigError(f"run {chosen}: no {files.status_path}")
        if status.get("status") == "running":
            raise ConfigError(f"run {chosen} is still running; stop it first")
        if status.get("status") not in RESUMABLE:
            raise ConfigError(f"run {chosen} ended {status.get('status')}: nothing to resume")
        point = find_resume_point(files)
        overrides = {
            "tracking-uri": coordinator.addresses().tracking_uri,
            "run-dir": str(coordinator.home),
            "resume-run": int(chosen),
        }
        flower_run_id = submit(coordinator, overrides, staging_parent=coordinator.home / "staging")
    except (SicfedError, ValueError) as error:
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        raise typer.Exit(1) from None
    rounds = status.get("rounds", "?")
    console.print(
        f"resuming run {chosen} after round {point.server_round} of {rounds} as Flower run "
        f"{flower_run_id}"
    )
    audit = AuditLog(files.audit_path, chosen)
    audit.append(
        AuditEvent.RUN_SUBMITTED,
        actor=actor_here(),
        details={"overrides": overrides, "flower_run_id": str(flower_run_id)},
    )
    if not follow:
        return
    follow_to_the_end(
        coordinator,
        flower_run_id,
        run_dir=coordinator.home,
        audit=audit,
        timeout=timeout,
        log_run_id=int(chosen),
    )
