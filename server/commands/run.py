"""``python -m server run``: submit a federation run and follow it round by round."""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from server.audit import AuditEvent, AuditLog, actor_here
from server.checkpoint import RunFiles, read_status
from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator, follow_run, round_table, submit
from server.flower_cli import server_app_log, stop_run
from server.processes import log_tail
from server.run_watch import RunLostError, error_excerpt, exception_line, mark_run_ended
from server.settings import RunSettings
from sic_core.cli_vocabulary import warn_deprecated
from sic_core.errors import SicfedError

__all__ = ["follow_to_the_end", "parse_overrides", "run"]

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

    The run writes its round log, status, audit log and reports under HOME/runs/<run id>/,
    its checkpoints under HOME/checkpoints/<run id>/ (the run config's run-dir is HOME), and
    logs to the coordinator's MLflow server (parent run fed-<run id>, one child run per
    site). Every key and value of --set is checked before anything is submitted. If the
    SuperLink or the ServerApp dies, this exits 1 within 30 s with the cause and the
    ServerApp's error (from `flwr log`), and marks the run failed in
    HOME/runs/<run id>/status.json and MLflow.

    Examples
    --------
    python -m server run --set rounds=5 --set local-epochs=2
    python -m server run --set strategy=fedprox --set proximal-mu=0.1 --no-follow
    """
    coordinator = Coordinator(home)
    try:
        addresses = coordinator.addresses()
        overrides = {"tracking-uri": addresses.tracking_uri, **parse_overrides(set_ or [])}
        if "run-dir" in overrides:  # the run then lives outside HOME, where no command looks
            warn_deprecated("--set run-dir=...", "--home (the run folder is HOME/runs/<run id>)")
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
    follow_to_the_end(coordinator, run_id, run_dir=run_dir, audit=audit, timeout=timeout)


def follow_to_the_end(
    coordinator: Coordinator,
    run_id: int,
    *,
    run_dir: Path,
    audit: AuditLog,
    timeout: float,
    log_run_id: int | None = None,
) -> None:
    """Stream a run's rounds; exit non-zero with a one-line cause unless it completes.

    The SuperLink process is checked every second and the ServerApp's heartbeat at every
    poll, so a dead coordinator is noticed within seconds (instead of after ``timeout``). A
    run that ends badly gets ``failed`` (or ``killed`` on Ctrl-C and timeout) in its
    ``status.json`` and MLflow runs, and the ServerApp's error from Flower's log
    (``flwr log``) is printed. ``log_run_id`` is the run whose files the ServerApp writes
    (a resumed run writes into the original run's).
    """
    files = RunFiles(run_dir, log_run_id or run_id)

    def show(entry: dict[str, Any]) -> None:
        console.print(round_table([entry], title=f"run {run_id}, round {entry['round']}"))

    try:
        outcome = follow_run(
            coordinator,
            run_id,
            run_dir=run_dir,
            on_round=show,
            timeout=timeout,
            check=coordinator.check_superlink,
            log_run_id=log_run_id,
        )
    except RunLostError as error:
        mark_run_ended(files, "failed", f"run_lost: {error}")
        audit.append(
            AuditEvent.RUN_FAILED, actor=actor_here(), details={"reason": f"run_lost: {error}"}
        )
        _print_server_app_error(coordinator, run_id)
        console.print(Text(f"error: run {run_id} lost: {error}", style="red"), soft_wrap=True)
        raise typer.Exit(1) from None
    except (KeyboardInterrupt, SicfedError) as error:
        cause = "interrupted" if isinstance(error, KeyboardInterrupt) else str(error)
        console.print(f"stopping run {run_id} ({cause})", soft_wrap=True)
        with contextlib.suppress(SicfedError):
            stop_run(run_id, coordinator.flwr_home)
        mark_run_ended(files, "killed", f"stopped by server run: {cause}")
        audit.append(AuditEvent.RUN_STOPPED, actor=actor_here(), details={"reason": cause})
        raise typer.Exit(1) from None
    console.print(round_table(outcome.rounds, title=f"run {run_id}: {outcome.status}"))
    if outcome.status == "completed":
        return
    status = read_status(files.status_path) or {}
    reason = str(status.get("reason", ""))
    if not status:
        reason = "serverapp_failed: the ServerApp stopped before its first round"
        mark_run_ended(files, "failed", reason)
    elif status.get("status") != "failed":  # the ServerApp died before it could record it
        reason = "serverapp_died: Flower ended the run but the ServerApp recorded no outcome"
        mark_run_ended(files, "failed", reason)
    exception = _print_server_app_error(coordinator, run_id)
    cause = f"{reason or 'unknown'}" + (f" ({exception})" if exception else "")
    console.print(Text(f"error: run {run_id} failed: {cause}", style="red"), soft_wrap=True)
    raise typer.Exit(1)


def _print_server_app_error(coordinator: Coordinator, run_id: int) -> str | None:
    """Print the failing part of the ServerApp's log (``flwr log``, else the SuperLink log).

    Returns the exception that ended it (``SomeError: message``), if the log names one.
    """
    try:
        text = server_app_log(run_id, coordinator.flwr_home)
        source = f"flwr log {run_id}"
    except SicfedError:
        path = coordinator.logs / "superlink.log"
        text = log_tail(path, lines=200)
        source = str(path)
    excerpt = error_excerpt(text)
    if excerpt:
        console.print(f"ServerApp log ({source}):", soft_wrap=True)
        console.print(Text(excerpt), soft_wrap=True)
    return exception_line(excerpt)
