"""Visible failures: a dead SuperLink or ServerApp is noticed, reported and recorded."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path

import pytest
import typer
from mlflow.tracking import MlflowClient
from rich.console import Console
from typer.testing import CliRunner

from server import coordinator as coordinator_module
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


def _unreachable(run_id: int, flwr_home: Path) -> dict:
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


def test_follow_run_notices_a_dead_superlink_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "run_info", _unreachable)
    coordinator = Coordinator(tmp_path)
    with ProcessGroup() as group:
        _sleeper(group, "superlink", tmp_path)
        group.write_pid_file(coordinator.pid_file)
        _running_run(tmp_path)
        group.stop_all()  # kill the "SuperLink"
        started = time.monotonic()
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
    assert time.monotonic() - started < 2.0


def test_follow_run_gives_up_on_a_superlink_that_stops_answering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "run_info", _unreachable)
    _running_run(tmp_path)
    started = time.monotonic()
    with pytest.raises(RunLostError, match="has not answered for"):
        follow_run(
            Coordinator(tmp_path),
            RUN_ID,
            run_dir=tmp_path,
            on_round=lambda entry: None,
            timeout=86400,
            poll_interval=0.05,
            flower_poll_interval=0.1,
            unreachable_after=0.5,
        )
    assert time.monotonic() - started < 3.0


def test_follow_run_notices_a_dead_serverapp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "run_info", lambda *_: {"status": "running"})
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


def test_a_lost_run_fails_with_its_cause_and_serverapp_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_runs: tuple[str, str, str]
) -> None:
    """`server run`'s follower: dead SuperLink -> one line, the ServerApp's error, FAILED."""
    uri, parent, child = mlflow_runs
    monkeypatch.setattr(coordinator_module, "run_info", _unreachable)
    monkeypatch.setattr(run_command, "server_app_log", _unreachable)
    monkeypatch.setattr(run_command, "stop_run", _unreachable)
    coordinator = Coordinator(tmp_path)
    (coordinator.logs).mkdir(parents=True)
    (coordinator.logs / "superlink.log").write_text(SERVERAPP_LOG)
    coordinator.pid_file.write_text(
        json.dumps({"superlink": {"pid": 2**22 + 1, "log": str(coordinator.logs / "x.log")}})
    )
    files = _running_run(tmp_path, tracking_uri=uri, mlflow_parent_run_id=parent)
    audit = run_command.AuditLog(files.audit_path, RUN_ID)
    printed_to = io.StringIO()
    monkeypatch.setattr(run_command, "console", Console(file=printed_to, width=300))
    with pytest.raises(typer.Exit) as exit_info:
        run_command.follow_to_the_end(
            coordinator, RUN_ID, run_dir=tmp_path, audit=audit, timeout=86400
        )
    printed = printed_to.getvalue()
    assert exit_info.value.exit_code == 1
    assert "run 42 lost: the SuperLink (pid 4194305) is not running" in printed
    assert "ConfigError: initial-weights: file /srv/w.pt does not exist" in printed
    status = read_status(files.status_path)
    assert status["status"] == "failed" and status["reason"].startswith("run_lost")
    assert status["mlflow_closed"] is True
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(child).info.status == "FAILED"
    assert "run_failed" in files.audit_path.read_text()


def test_the_next_start_status_or_resume_marks_a_crashed_run(
    tmp_path: Path, mlflow_runs: tuple[str, str, str]
) -> None:
    uri, parent, child = mlflow_runs
    files = _running_run(tmp_path, tracking_uri=uri, mlflow_parent_run_id=parent)
    other = RunFiles(tmp_path, 7)
    other.write_status("completed", rounds=4)
    assert reconcile_runs(tmp_path, superlink_alive=True) == []  # no sign of death yet
    marked = reconcile_runs(tmp_path, superlink_alive=False)
    assert marked == [
        f"run {RUN_ID}: failed (the SuperLink process is not running (killed or crashed))"
    ]
    assert read_status(files.status_path)["status"] == "failed"
    assert read_status(other.status_path)["status"] == "completed"
    assert MlflowClient(tracking_uri=uri).get_run(child).info.status == "FAILED"
    assert reconcile_runs(tmp_path, superlink_alive=False) == []  # once only


def test_a_run_stopped_by_the_operator_is_killed(
    tmp_path: Path, mlflow_runs: tuple[str, str, str]
) -> None:
    uri, parent, _ = mlflow_runs
    files = _running_run(tmp_path, tracking_uri=uri, mlflow_parent_run_id=parent)
    reconcile_runs(tmp_path, superlink_alive=False, stopped_by="server stop")
    assert read_status(files.status_path)["status"] == "killed"
    assert MlflowClient(tracking_uri=uri).get_run(parent).info.status == "KILLED"


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
    beat = read_heartbeats(database)[node]
    assert beat.seconds_since < 5 and not beat.lost
    later = read_heartbeats(database, now=time.time() + 31)[node]
    assert later.lost and later.seconds_since > 30


def test_a_serverapp_that_raised_shows_its_error_from_flwr_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coordinator_module, "run_info", lambda *_: {"status": "finished:failed"})
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
            audit=run_command.AuditLog(files.audit_path, RUN_ID),
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
