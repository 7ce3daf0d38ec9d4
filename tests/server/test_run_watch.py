"""Visible failures: a dead SuperLink or ServerApp is noticed, reported and recorded."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from server import coordinator as coordinator_module
from server import run_watch
from server.audit import actor_here, verify_audit_log
from server.checkpoint import RunFiles, read_status
from server.cli import app
from server.commands import run as run_command
from server.coordinator import Coordinator, follow_run
from server.flower_cli import FlowerCliError
from server.processes import ProcessGroup, pid_alive
from server.run_watch import (
    HEARTBEAT_STALE_AFTER,
    RunLostError,
    ServerAppHeartbeat,
    error_excerpt,
    exception_line,
    liveness_problem,
    mark_run_ended,
    reconcile_runs,
)
from server.site_liveness import HEARTBEAT_PATIENCE, read_heartbeats

runner = CliRunner()
RUN_ID = 42
ACTOR = "alice@coordinator"

SERVERAPP_LOG = """\
INFO :      [ROUND 1/4]
INFO :      round 1 done in 20.1 s
ERROR :     federation run 42 failed (config_error)
Traceback (most recent call last):
  File "server/app.py", line 170, in main
sic_core.errors.ConfigError: initial-weights: file /srv/w.pt does not exist
"""


def _sleeper(group: ProcessGroup, name: str, home: Path) -> int:
    process = group.start(
        name,
        [sys.executable, "-c", "import time; time.sleep(600)"],
        log_path=home / "logs" / f"{name}.log",
        env=None,
    )
    return process.pid


def _running_run(home: Path, **status: object) -> RunFiles:
    files = RunFiles(home, RUN_ID)
    files.write_status("running", rounds=4, **status)
    return files


def _unreachable(run_id: int, flwr_home: Path, **_: object) -> dict:
    raise FlowerCliError("`flwr list` failed (exit 1): connection refused")


def test_heartbeat_tells_a_live_serverapp_from_a_dead_one(tmp_path: Path) -> None:
    files = _running_run(tmp_path)
    with ServerAppHeartbeat(files, interval=0.05) as beat:
        time.sleep(0.2)
        assert liveness_problem(files, superlink_alive=True) is None
        beat_time = beat.path.stat().st_mtime
        later = beat_time + HEARTBEAT_STALE_AFTER + 5
        cause = liveness_problem(files, superlink_alive=True, now=later)
        assert cause is not None and "ServerApp stopped: no heartbeat for 25 s" in cause
    assert not beat.path.exists()  # a ServerApp that ended leaves no heartbeat behind
    assert "SuperLink process is not running" in liveness_problem(files, superlink_alive=False)


def test_error_excerpt_keeps_the_serverapp_traceback() -> None:
    excerpt = error_excerpt(SERVERAPP_LOG)
    assert excerpt.startswith("Traceback") and excerpt.endswith("does not exist")
    assert (
        error_excerpt("INFO : a\n\x1b[91mERROR\x1b[0m : boom\nINFO : b") == "ERROR : boom\nINFO : b"
    )
    assert error_excerpt("INFO : a\nWARNING : retrying") == ""  # nothing to show
    assert exception_line(SERVERAPP_LOG + "ERROR : Exit Code: 201\n") == (
        "sic_core.errors.ConfigError: initial-weights: file /srv/w.pt does not exist"
    )


class FakeClock:
    """Stands in for ``time`` in :mod:`server.coordinator`: ``sleep`` advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_follow_run_checks_the_superlink_process_before_asking_flower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[int] = []
    monkeypatch.setattr(
        coordinator_module, "run_info", lambda run_id, *_, **__: asked.append(run_id) or {}
    )
    coordinator = Coordinator(tmp_path)
    with ProcessGroup() as group:
        _sleeper(group, "superlink", tmp_path)
        group.write_pid_file(coordinator.pid_file)
        _running_run(tmp_path)
        group.stop_all()  # kill the "SuperLink"
        with pytest.raises(RunLostError, match=r"SuperLink .* is not running"):
            follow_run(
                coordinator,
                RUN_ID,
                run_dir=tmp_path,
                on_round=lambda entry: None,
                timeout=86400,
                check=coordinator.check_superlink,
                poll_interval=0.05,
            )
    assert asked == []  # the dead process was named before Flower was asked anything


def test_follow_run_gives_up_on_a_superlink_that_stops_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(coordinator_module, "time", clock)
    asked: list[float] = []

    def unreachable(run_id: int, flwr_home: Path, *, timeout: float) -> dict:
        asked.append(clock.now)
        assert timeout == 120.0  # one `flwr list` is bounded too
        raise FlowerCliError("`flwr list` failed (exit 1): connection refused")

    monkeypatch.setattr(coordinator_module, "run_info", unreachable)
    _running_run(tmp_path)
    started = clock.now
    with pytest.raises(RunLostError, match="has not answered for 25 s"):
        follow_run(
            Coordinator(tmp_path),
            RUN_ID,
            run_dir=tmp_path,
            on_round=lambda entry: None,
            timeout=86400,
            poll_interval=1.0,
            flower_poll_interval=5.0,
            unreachable_after=20.0,
        )
    # Asked every 5 s; the first failure more than 20 s after the start ends it.
    assert [when - started for when in asked] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]


def test_follow_run_notices_a_dead_serverapp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "run_info", lambda *_, **__: {"status": "running"})
    files = _running_run(tmp_path)
    heartbeat = files.log_dir / "heartbeat"
    heartbeat.touch()
    stale = time.time() - HEARTBEAT_STALE_AFTER - 1
    os.utime(heartbeat, (stale, stale))
    with pytest.raises(RunLostError, match="ServerApp stopped"):
        follow_run(
            Coordinator(tmp_path),
            RUN_ID,
            run_dir=tmp_path,
            on_round=lambda entry: None,
            timeout=5,
            poll_interval=0.05,
        )


@pytest.fixture
def mlflow_runs(tmp_path: Path) -> tuple[str, str, str]:
    """A sqlite MLflow store with a RUNNING parent run and one RUNNING child run."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("sicfed/test")
    parent = client.create_run(experiment, run_name=f"fed-{RUN_ID}").info.run_id
    child = client.create_run(
        experiment, run_name="site-a", tags={"mlflow.parentRunId": parent}
    ).info.run_id
    return uri, parent, child


def _follow_a_run_whose_superlink_died(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **status: object
) -> tuple[int, list[str], RunFiles]:
    """`server run`'s follower on a run whose SuperLink process is gone; (exit, lines, files)."""
    monkeypatch.setattr(coordinator_module, "run_info", _unreachable)
    asked_flower_log: list[int] = []
    monkeypatch.setattr(
        run_command, "server_app_log", lambda run_id, *_, **__: asked_flower_log.append(run_id)
    )
    monkeypatch.setattr(run_command, "stop_run", _unreachable)
    coordinator = Coordinator(tmp_path)
    (coordinator.logs).mkdir(parents=True)
    (coordinator.logs / "superlink.log").write_text(SERVERAPP_LOG)
    coordinator.pid_file.write_text(
        json.dumps({"superlink": {"pid": 2**22 + 1, "log": str(coordinator.logs / "x.log")}})
    )
    files = _running_run(tmp_path, **status)
    printed_to = io.StringIO()
    monkeypatch.setattr(run_command, "console", Console(file=printed_to, width=300))
    with pytest.raises(typer.Exit) as exit_info:
        run_command.follow_to_the_end(coordinator, RUN_ID, run_dir=tmp_path, timeout=86400)
    # A dead SuperLink's log is read from its file: `flwr log` would only time out.
    assert asked_flower_log == []
    return exit_info.value.exit_code, printed_to.getvalue().rstrip().splitlines(), files


def test_a_lost_run_fails_with_its_cause_and_serverapp_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_runs: tuple[str, str, str]
) -> None:
    """`server run`'s follower: dead SuperLink -> one line, the ServerApp's error, FAILED."""
    uri, parent, child = mlflow_runs
    code, lines, files = _follow_a_run_whose_superlink_died(
        tmp_path, monkeypatch, tracking_uri=uri, mlflow_parent_run_id=parent
    )
    assert code == 1
    assert lines[-1] == "error: run 42 lost: the SuperLink (pid 4194305) is not running"
    assert "ConfigError: initial-weights: file /srv/w.pt does not exist" in "\n".join(lines)
    status = read_status(files.status_path)
    assert status["status"] == "failed" and status["reason"].startswith("run_lost")
    assert status["mlflow_closed"] is True
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(child).info.status == "FAILED"
    assert _audit_events(files) == [("run_failed", actor_here(), status["reason"])]


def test_a_lost_run_is_reported_when_mlflow_hangs_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hanging_mlflow: tuple[str, list]
) -> None:
    """SuperLink and MLflow gone: the follower names the SuperLink, MLflow is left for later."""
    uri, accepted = hanging_mlflow
    monkeypatch.setattr(run_watch, "MLFLOW_CLOSE_TIMEOUT", 0.5)
    code, lines, files = _follow_a_run_whose_superlink_died(
        tmp_path, monkeypatch, tracking_uri=uri, mlflow_parent_run_id="0" * 32
    )
    assert code == 1
    assert lines[-1] == "error: run 42 lost: the SuperLink (pid 4194305) is not running"
    assert accepted  # MLflow was asked, and did not answer
    status = read_status(files.status_path)
    assert status["status"] == "failed" and status["mlflow_closed"] is False
    assert [event for event, _, _ in _audit_events(files)] == ["run_failed"]


def test_the_next_start_status_or_resume_marks_a_crashed_run(
    tmp_path: Path, mlflow_runs: tuple[str, str, str]
) -> None:
    uri, parent, child = mlflow_runs
    files = _running_run(tmp_path, tracking_uri=uri, mlflow_parent_run_id=parent)
    other = RunFiles(tmp_path, 7)
    other.write_status("completed", rounds=4)
    assert reconcile_runs(tmp_path, superlink_alive=True, actor=ACTOR) == []  # alive yet
    marked = reconcile_runs(tmp_path, superlink_alive=False, actor=ACTOR)
    assert marked == [
        f"run {RUN_ID}: failed (the SuperLink process is not running (killed or crashed))"
    ]
    assert read_status(files.status_path)["status"] == "failed"
    assert read_status(other.status_path)["status"] == "completed"
    assert MlflowClient(tracking_uri=uri).get_run(child).info.status == "FAILED"
    # Nobody else saw it die: the audit log says so, as a follower would have.
    assert _audit_events(files) == [
        ("run_failed", ACTOR, "run_lost: the SuperLink process is not running (killed or crashed)")
    ]
    assert verify_audit_log(files.audit_path).ok
    assert not other.audit_path.exists()
    assert reconcile_runs(tmp_path, superlink_alive=False, actor=ACTOR) == []  # once only
    assert len(_audit_events(files)) == 1


def test_a_run_stopped_by_the_operator_is_killed(
    tmp_path: Path, mlflow_runs: tuple[str, str, str]
) -> None:
    uri, parent, _ = mlflow_runs
    files = _running_run(tmp_path, tracking_uri=uri, mlflow_parent_run_id=parent)
    reconcile_runs(tmp_path, superlink_alive=False, actor=ACTOR, stopped_by="server stop")
    assert read_status(files.status_path)["status"] == "killed"
    assert MlflowClient(tracking_uri=uri).get_run(parent).info.status == "KILLED"
    assert _audit_events(files) == [("run_stopped", ACTOR, "stopped by server stop")]


def _audit_events(files: RunFiles) -> list[tuple[str, str, str]]:
    if not files.audit_path.exists():
        return []
    entries = [json.loads(line) for line in files.audit_path.read_text().splitlines()]
    return [(e["event"], e["actor"], e["details"].get("reason", "")) for e in entries]


@pytest.fixture
def hanging_mlflow() -> Iterator[tuple[str, list[socket.socket]]]:
    """An MLflow address that accepts connections and never answers (a hung server)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        server.close()
        for connection in accepted:
            connection.close()


def test_closing_mlflow_is_bounded_and_comes_after_status_and_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hanging_mlflow: tuple[str, list]
) -> None:
    """A hung MLflow server costs MLFLOW_CLOSE_TIMEOUT, after everything else is recorded."""
    uri, accepted = hanging_mlflow
    monkeypatch.setattr(run_watch, "MLFLOW_CLOSE_TIMEOUT", 0.5)
    files = _running_run(tmp_path, tracking_uri=uri, mlflow_parent_run_id="0" * 32)
    seen_when_mlflow_was_asked: list[tuple[str, list]] = []
    real_close = run_watch._close_mlflow_runs_now

    def close_now(*args: object) -> bool:
        seen_when_mlflow_was_asked.append(
            (read_status(files.status_path)["status"], _audit_events(files))
        )
        return real_close(*args)

    monkeypatch.setattr(run_watch, "_close_mlflow_runs_now", close_now)
    assert mark_run_ended(files, "failed", "run_lost: test", actor=ACTOR) is False
    assert accepted  # MLflow was asked, and did not answer
    assert seen_when_mlflow_was_asked == [("failed", [("run_failed", ACTOR, "run_lost: test")])]
    status = read_status(files.status_path)
    assert status["status"] == "failed" and status["mlflow_closed"] is False
    assert status["rounds"] == 4  # the other fields stay


def test_mlflow_down_is_retried_later(tmp_path: Path) -> None:
    files = _running_run(tmp_path, tracking_uri="http://127.0.0.1:9", mlflow_parent_run_id="0" * 32)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        mark_run_ended(files, "failed", "run_lost: test")
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    status = read_status(files.status_path)
    assert status["status"] == "failed" and status["mlflow_closed"] is False
    assert status["rounds"] == 4  # the other fields stay


def test_stop_keep_mlflow_restarts_only_the_superlink(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path)
    with ProcessGroup() as group:
        mlflow = _sleeper(group, "mlflow", tmp_path)
        superlink = _sleeper(group, "superlink", tmp_path)
        group.write_pid_file(coordinator.pid_file)
        coordinator.address_file.write_text("{}")
        files = _running_run(tmp_path)
        result = runner.invoke(app, ["stop", "--home", str(tmp_path), "--keep-mlflow"])
        assert result.exit_code == 0, result.output
        assert not pid_alive(superlink) and pid_alive(mlflow)
        status = read_status(files.status_path)
        assert (status["status"], status["reason"]) == ("killed", "stopped by server stop")
        assert set(coordinator.recorded_processes()) == {"mlflow"}
        assert coordinator.address_file.exists()  # `start` reuses MLflow's address
        coordinator.pid_file.write_text(json.dumps({"superlink": {"pid": mlflow, "log": "x"}}))
        result = runner.invoke(app, ["start", "--home", str(tmp_path), "--insecure"])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and "already runs the SuperLink" in output


def test_status_sees_a_site_that_missed_a_heartbeat(tmp_path: Path) -> None:
    """Read from a state database that Flower's own SQL link state wrote."""
    from flwr.common import constant
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager

    assert constant.HEARTBEAT_PATIENCE == HEARTBEAT_PATIENCE
    database = tmp_path / "state.db"
    state = LinkStateFactory(str(database), NoOpFederationManager(), ObjectStoreFactory()).state()
    node = state.create_node("aid", "site", b"key" * 10, 30.0)
    state.activate_node(node, 30.0)
    activated = time.time()
    beat = read_heartbeats(database, now=activated)[node]
    assert not beat.lost and beat.seconds_since >= 0
    later = read_heartbeats(database, now=activated + 31)[node]
    assert later.lost and later.seconds_since > 30


def test_a_serverapp_that_raised_shows_its_error_from_flwr_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        coordinator_module, "run_info", lambda *_, **__: {"status": "finished:failed"}
    )
    monkeypatch.setattr(run_command, "server_app_log", lambda *_: SERVERAPP_LOG)
    printed_to = io.StringIO()
    monkeypatch.setattr(run_command, "console", Console(file=printed_to, width=300))
    coordinator = Coordinator(tmp_path)
    files = RunFiles(tmp_path, RUN_ID)
    with ProcessGroup() as group, pytest.raises(typer.Exit) as exit_info:
        _sleeper(group, "superlink", tmp_path)
        group.write_pid_file(coordinator.pid_file)
        run_command.follow_to_the_end(
            coordinator,
            RUN_ID,
            run_dir=tmp_path,
            timeout=60,
        )
    printed = printed_to.getvalue()
    assert exit_info.value.exit_code == 1
    assert f"ServerApp log (flwr log {RUN_ID})" in printed
    assert "ConfigError: initial-weights: file /srv/w.pt does not exist" in printed
    assert printed.rstrip().splitlines()[-1] == (
        f"error: run {RUN_ID} failed: serverapp_failed: the ServerApp stopped before its first "
        "round (sic_core.errors.ConfigError: initial-weights: file /srv/w.pt does not exist)"
    )
    assert read_status(files.status_path)["status"] == "failed"
