"""Noticing that a federation run died, and recording how it ended.

Flower does not tell a follower that the SuperLink died (``flwr list`` just fails) and a
ServerApp killed from outside leaves ``status.json`` at ``running`` and its MLflow runs at
RUNNING. Three pieces close that gap:

- :class:`ServerAppHeartbeat`: the ServerApp touches ``runs/<id>/heartbeat`` every few
  seconds while it runs, so anyone on the coordinator can tell a live ServerApp from a dead
  one (:func:`heartbeat_age`);
- :func:`liveness_problem`: the one-line cause of death of a running run (SuperLink process
  gone, ServerApp heartbeat stale), or ``None``;
- :func:`mark_run_ended` and :func:`reconcile_runs`: write ``failed``/``killed`` into
  ``status.json`` and close the run's MLflow parent and child runs as FAILED/KILLED, at
  once (``server run``) or after a crash (``server start``, ``status``, ``resume``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

from server.audit import AuditEvent, AuditLog
from server.checkpoint import RunFiles, read_status
from sic_core.errors import SicfedError

__all__ = [
    "HEARTBEAT_INTERVAL",
    "HEARTBEAT_STALE_AFTER",
    "MLFLOW_CLOSE_TIMEOUT",
    "RunLostError",
    "ServerAppHeartbeat",
    "error_excerpt",
    "exception_line",
    "heartbeat_age",
    "heartbeat_path",
    "liveness_problem",
    "mark_run_ended",
    "reconcile_runs",
    "strip_ansi",
]

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a running ServerApp.
HEARTBEAT_INTERVAL = 5.0
#: A heartbeat older than this means the ServerApp is gone (three missed beats plus slack
#: for a busy machine; well inside the 30 s within which ``server run`` must notice).
HEARTBEAT_STALE_AFTER = 20.0

#: Seconds that closing a run's MLflow runs may take. MLflow's client retries a dead server
#: with exponential backoff for about 4 minutes; a follower that noticed a dead coordinator
#: must not wait for that (``status.json`` then says ``mlflow_closed: false`` and the next
#: ``start``, ``status`` or ``resume`` closes them).
MLFLOW_CLOSE_TIMEOUT = 10.0

EndStatus = Literal["failed", "killed"]

#: Terminal colour codes, as Flower writes them into its logs.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
#: The last line of a Python traceback: ``package.module.SomeError: message``.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\w*: .+")


class RunLostError(SicfedError):
    """The SuperLink or the ServerApp of a run died while the run was going on."""

    reason = "run_lost"


class ServerAppHeartbeat:
    """Touch the run's heartbeat file every ``interval`` seconds while in the ``with`` block.

    Parameters
    ----------
    files
        The run's files (the heartbeat is ``files.log_dir / "heartbeat"``).
    interval
        Seconds between two touches.
    """

    def __init__(self, files: RunFiles, *, interval: float = HEARTBEAT_INTERVAL) -> None:
        self.path = heartbeat_path(files)
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="serverapp-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            # A full disk must not end the federation; the follower then reports a stale beat.
            with contextlib.suppress(OSError):
                self.path.touch()
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> ServerAppHeartbeat:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()  # fresh before the caller goes on (an old one may be left over)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def heartbeat_path(files: RunFiles) -> Path:
    """Where the ServerApp of a run writes its heartbeat."""
    return files.log_dir / "heartbeat"


def heartbeat_age(files: RunFiles, *, now: float | None = None) -> float | None:
    """Seconds since the ServerApp's last heartbeat, or ``None`` if it wrote none."""
    try:
        beat = heartbeat_path(files).stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - beat


def liveness_problem(
    files: RunFiles,
    *,
    superlink_alive: bool,
    stale_after: float = HEARTBEAT_STALE_AFTER,
    now: float | None = None,
) -> str | None:
    """Why a run whose ``status.json`` says ``running`` cannot be running, or ``None``.

    Parameters
    ----------
    files
        The run's files.
    superlink_alive
        Whether the coordinator's SuperLink process exists.
    stale_after
        Heartbeat age (s) after which the ServerApp counts as dead.
    now
        Current time (``time.time()``), for tests.

    Returns
    -------
    str or None
        A one-line cause, e.g. ``"the ServerApp stopped: no heartbeat for 42 s (...)"``.
    """
    if not superlink_alive:
        return "the SuperLink process is not running (killed or crashed)"
    age = heartbeat_age(files, now=now)
    if age is not None and age > stale_after:
        return (
            f"the ServerApp stopped: no heartbeat for {age:.0f} s "
            f"({heartbeat_path(files)}; it beats every {HEARTBEAT_INTERVAL:.0f} s)"
        )
    return None


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI_ESCAPE.sub("", text)


def error_excerpt(log_text: str, *, max_lines: int = 15) -> str:
    """The part of a ServerApp log that says why it failed ('' if it names no error).

    From the last traceback (or, without one, the last ``ERROR`` line) to the end, at most
    ``max_lines`` lines, without colour codes.
    """
    lines = strip_ansi(log_text).rstrip().splitlines()
    for marker in ("Traceback (most recent call last)", "ERROR"):
        starts = [index for index, line in enumerate(lines) if marker in line]
        if starts:
            return "\n".join(lines[starts[-1] :][-max_lines:])
    return ""


def exception_line(log_text: str) -> str | None:
    """The last ``SomeError: message`` line of a log (the exception that ended a traceback)."""
    for line in reversed(strip_ansi(log_text).splitlines()):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()
    return None


def mark_run_ended(
    files: RunFiles, status: EndStatus, reason: str, *, actor: str | None = None
) -> bool:
    """Record that a run ended badly: ``status.json``, the audit log and its MLflow runs.

    In that order, so that nothing waits on MLflow: ``status.json`` keeps its other fields
    and gets ``status`` and ``reason``; with ``actor`` (who noticed, e.g. ``user@host``)
    the audit log gets ``run_failed`` (or ``run_stopped`` for ``killed``) with the
    reason. Then the MLflow parent run named there (``mlflow_parent_run_id``) and its
    child runs still RUNNING are closed as FAILED or KILLED, within
    :data:`MLFLOW_CLOSE_TIMEOUT`; an unreachable MLflow server is logged, not raised, and
    ``status.json`` keeps ``mlflow_closed: false`` (the next ``start``, ``status`` or
    ``resume`` tries again). Returns whether the MLflow runs are closed.
    """
    previous = read_status(files.status_path) or {}
    details = {k: v for k, v in previous.items() if k not in ("run_id", "status")}
    details["reason"] = reason
    tracked = bool(previous.get("tracking_uri") and previous.get("mlflow_parent_run_id"))
    files.write_status(status, **{**details, "mlflow_closed": not tracked})
    if actor is not None:
        event = AuditEvent.RUN_STOPPED if status == "killed" else AuditEvent.RUN_FAILED
        AuditLog(files.audit_path, files.run_id).append(
            event, actor=actor, details={"reason": reason}
        )
    if not tracked:
        return True
    closed = _close_mlflow_runs(previous, status)
    if closed:
        files.write_status(status, **{**details, "mlflow_closed": True})
    return closed


def _close_mlflow_runs(
    status: dict[str, Any], end: EndStatus, *, timeout: float = MLFLOW_CLOSE_TIMEOUT
) -> bool:
    """Close the parent and still-running child runs; True when done (or nothing to do).

    Gives up after ``timeout`` seconds (the attempt goes on in a daemon thread, which
    dies with this process).
    """
    tracking_uri = status.get("tracking_uri")
    parent = status.get("mlflow_parent_run_id")
    if not tracking_uri or not parent:
        return True
    closed: list[bool] = []
    worker = threading.Thread(
        target=lambda: closed.append(_close_mlflow_runs_now(tracking_uri, parent, end)),
        name="mlflow-close",
        daemon=True,
    )
    worker.start()
    worker.join(timeout)
    if not closed:
        log.warning(
            "MLflow at %s did not answer within %.0f s: the runs of parent %s stay open until "
            "the next `server start`, `status` or `resume`",
            tracking_uri,
            timeout,
            parent,
        )
        return False
    return closed[0]


def _close_mlflow_runs_now(tracking_uri: str, parent: str, end: EndStatus) -> bool:
    # Imported here, inside the bounded attempt: on a busy machine the import alone takes
    # seconds.
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    terminal = RunStatus.to_string(RunStatus.KILLED if end == "killed" else RunStatus.FAILED)
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_run(parent).info.experiment_id
        children = client.search_runs(
            [experiment],
            filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'",
        )
        for child in children:
            client.set_terminated(child.info.run_id, status=terminal)
        if client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, status=terminal)
    except Exception as error:  # MLflow may be down too; status.json says so
        log.warning("could not close the MLflow runs of parent %s: %s", parent, error)
        return False
    return True


def reconcile_runs(
    run_dir: Path, *, superlink_alive: bool, actor: str, stopped_by: str | None = None
) -> list[str]:
    """Mark every run under ``run_dir`` that died without saying so as failed.

    A run counts as dead when its ``status.json`` says ``running`` and
    :func:`liveness_problem` names a cause; it is marked as :func:`mark_run_ended` does,
    audit log included (nobody else saw it die). A run that already ended badly but whose
    MLflow runs could not be closed then is retried.

    Parameters
    ----------
    run_dir
        The runs' ``run-dir`` (the coordinator home by default).
    superlink_alive
        Whether the coordinator's SuperLink process exists.
    actor
        Who noticed (the audit entries' ``actor``, e.g. :func:`server.audit.actor_here`).
    stopped_by
        The operator's command that stopped the SuperLink (e.g. ``server stop``): dead
        runs are then marked ``killed`` (``run_stopped``) with that cause instead of
        ``failed``.

    Returns
    -------
    list[str]
        One line per run marked, e.g. ``"run 42: failed (the SuperLink ...)"``.
    """
    marked = []
    for status_path in sorted((Path(run_dir) / "runs").glob("*/status.json")):
        status = read_status(status_path) or {}
        files = RunFiles(Path(run_dir), status_path.parent.name)
        if status.get("status") == "running":
            cause = liveness_problem(files, superlink_alive=superlink_alive)
            if cause is None:
                continue
            if stopped_by is not None:
                mark_run_ended(files, "killed", f"stopped by {stopped_by}", actor=actor)
                marked.append(f"run {files.run_id}: killed (stopped by {stopped_by})")
                continue
            mark_run_ended(files, "failed", f"run_lost: {cause}", actor=actor)
            marked.append(f"run {files.run_id}: failed ({cause})")
        elif (
            status.get("status") in ("failed", "killed")
            and status.get("mlflow_closed") is False
            and mark_run_ended(files, status["status"], str(status.get("reason", "")))
        ):
            marked.append(f"run {files.run_id}: MLflow runs closed as {status['status']}")
    return marked
