"""``python -m server run``: submit a federation run and follow it round by round."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from server.audit import AuditEvent, AuditLog, actor_here
from server.checkpoint import RunFiles
from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator, follow_run, round_table, submit
from server.flower_cli import stop_run
from server.settings import RunSettings
from sic_core.errors import SicfedError

__all__ = ["parse_overrides", "run"]

console = Console()


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["rounds=5", "strategy=fedprox"]`` -> ``{"rounds": 5, "strategy": "fedprox"}``.

    Values are read as TOML (numbers, booleans, quoted strings); anything else is a string.
    """
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value.strip()
    return overrides


def run(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Run-config override KEY=VALUE (repeatable), e.g. rounds=5."),
    ] = None,
    follow: Annotated[bool, typer.Option(help="Stream progress until the run ends.")] = True,
    timeout: Annotated[
        float, typer.Option(help="Seconds to follow before stopping the run.")
    ] = 86400.0,
) -> None:
    """Submit the SIC federation app with run-config overrides; stream the rounds.

    The run writes checkpoints under HOME/checkpoints/<run id>/ and logs to the coordinator's
    MLflow server (parent run fed-<run id>, one child run per site).

    Examples
    --------
    python -m server run --set rounds=5 --set local-epochs=2
    python -m server run --set strategy=fedprox --set proximal-mu=0.1 --no-follow
    """
    coordinator = Coordinator(home)
    try:
        addresses = coordinator.addresses()
        overrides = {"tracking-uri": addresses.tracking_uri, **parse_overrides(set_ or [])}
        # Flower would refuse a bad key only as "Invalid run configuration."; name it here.
        RunSettings.from_run_config(overrides)
        run_id = submit(coordinator, overrides, staging_parent=coordinator.home / "staging")
    except SicfedError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    console.print(f"submitted run {run_id}")
    run_dir = Path(str(overrides.get("run-dir", coordinator.home)))
    audit = AuditLog(RunFiles(run_dir, run_id).audit_path, run_id)
    audit.append(AuditEvent.RUN_SUBMITTED, actor=actor_here(), details={"overrides": overrides})
    if not follow:
        return

    def show(entry: dict[str, Any]) -> None:
        console.print(round_table([entry], title=f"run {run_id}, round {entry['round']}"))

    try:
        outcome = follow_run(coordinator, run_id, run_dir=run_dir, on_round=show, timeout=timeout)
    except (KeyboardInterrupt, SicfedError) as error:
        console.print(f"stopping run {run_id} ({type(error).__name__})")
        stop_run(run_id, coordinator.flwr_home)
        audit.append(
            AuditEvent.RUN_STOPPED, actor=actor_here(), details={"reason": type(error).__name__}
        )
        raise typer.Exit(1) from None
    console.print(round_table(outcome.rounds, title=f"run {run_id}: {outcome.status}"))
    if outcome.status != "completed":
        raise typer.Exit(1)
