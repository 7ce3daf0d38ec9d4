"""The coordinator's promises in operation, on loopback, through the CLI an operator uses.

One coordinator (``python -m server start``; ``--insecure`` and free ports: TLS and site
authentication are covered by ``test_security.py``) serves, in order:

1. a run whose bundle every site refuses: ``no_sites``, no checkpoint, failed everywhere;
2. ``server resume`` of a run whose id does not fit a signed 64-bit integer;
3. a crash that no follower saw: the coordinator guide's restart line brings the coordinator back on
   the ports it had and the lost run is ``run_failed`` in the audit log;
4. ``kill -9`` of the SuperLink, the ServerApp and MLflow together: ``server run`` exits 1
   naming the SuperLink, after recording the failure (no wall time is asserted; the
   ``operations`` benchmark measures it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from mlflow.tracking import MlflowClient

from bench.operations_bench import kill_and_follow
from client.app import app as client_app
from server.app import main
from server.app_bundle import app_bundle_hash
from server.audit import verify_audit_log
from server.checkpoint import RunFiles, read_rounds, read_status
from server.coordinator import Coordinator, free_port
from server.flower_cli import connected_nodes
from server.processes import ProcessGroup, flower_env, pid_alive, process_tree, wait_http_ok
from tests.server.fedkit import server_identity, write_site
from tests.server.test_federation import run_config_defaults
from tests.server.test_resume import CoordinatorCrashError, CrashingGrid

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(2400)]

#: The coordinator's guide, whose restart line after a crash the tests run.
GUIDE = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "coordinator.md"
SITES = ("site_a", "site_b")
SIZE = 16
#: Above 2**63 - 1: Flower run ids are unsigned 64-bit, its run-config integers signed.
BIG_RUN_ID = 15147595930455189831
#: A run config small enough for a busy 2-core machine.
SMALL_RUN = {"image-size": SIZE, "local-epochs": 1, "batch-size": 8, "n-shot": 2}


def python_m(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the checkout, stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        env=flower_env(None),
        check=False,
    )


def documented_restart_command(home: Path) -> list[str]:
    """The guide's restart line after a crash, as argv, for the coordinator in ``home``."""
    lines = GUIDE.read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("# after a coordinator"))
    line = lines[marker + 1].split("#")[0].strip()
    argv = shlex.split(line)
    # Nothing but the home: the host, ports and security options come from the first start.
    assert argv == ["python", "-m", "server", "start", "--home", "runs/coordinator"], line
    return [sys.executable, *argv[1:-1], str(home)]


@dataclass
class Deployment:
    root: Path
    coordinator: Coordinator
    ports: dict[str, int]

    @property
    def home(self) -> Path:
        return self.coordinator.home

    def tracking_uri(self) -> str:
        return self.coordinator.addresses().tracking_uri


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("operations")
    home = root / "coordinator"
    port = free_port(8300)
    ports = {"port": port, "control-port": free_port(port + 1), "mlflow-port": free_port(5300)}
    flags = [item for key, value in ports.items() for item in (f"--{key}", str(value))]
    started = python_m("server", "start", "--home", str(home), "--insecure", *flags)
    try:
        assert started.returncode == 0, started.stdout
        yield Deployment(root, Coordinator(home), ports)
    finally:
        python_m("server", "stop", "--home", str(home))


def _join(group: ProcessGroup, deployment: Deployment, approved: str, *extra: str) -> None:
    """Join both sites (approving ``approved``) and wait until they are online."""
    for index, name in enumerate(SITES):
        site = write_site(deployment.root / f"sites-{approved[-6:]}", name, size=SIZE, seed=index)
        approve = python_m("client", "approve", "--site", str(site), "--app-hash", approved)
        assert approve.returncode == 0, approve.stdout
        group.start(
            name,
            [
                sys.executable,
                "-m",
                "client",
                "join",
                "--site",
                str(site),
                "--superlink",
                f"127.0.0.1:{deployment.ports['port']}",
                "--insecure",
                "--local-port",
                str(free_port(9600 + index)),
                "--poll-interval",
                "0.25",
                "--threads",
                "1",
                *extra,
            ],
            log_path=deployment.root / "logs" / f"{name}-{approved[-6:]}.log",
            env=flower_env(None),
        )
    _wait_for_sites(deployment, len(SITES), group)


def _wait_for_sites(deployment: Deployment, count: int, group: ProcessGroup | None) -> None:
    deadline = time.monotonic() + 600
    while len(connected_nodes(deployment.coordinator.flwr_home)) != count:
        if group is not None:
            group.check_alive()
        assert time.monotonic() < deadline, f"not {count} sites online"
        time.sleep(1)


def _audit_events(files: RunFiles) -> list[dict]:
    return [json.loads(line) for line in files.audit_path.read_text().splitlines()]


def _run_id(output: str) -> str:
    return re.findall(r"submitted run (\d+)", output)[0]


def test_a_run_whose_bundle_every_site_refuses_fails_with_no_sites(
    deployment: Deployment,
) -> None:
    with ProcessGroup() as group:
        _join(group, deployment, "sha256:" + "0" * 64, "--cold", "--no-prepare")
        finished = python_m(
            "server",
            "run",
            "--home",
            str(deployment.home),
            *(item for key, value in SMALL_RUN.items() for item in ("--set", f"{key}={value}")),
            "--set",
            "rounds=1",
            "--set",
            f"min-sites={len(SITES)}",
        )
    assert finished.returncode == 1, finished.stdout
    run_id = _run_id(finished.stdout)
    last = finished.stdout.rstrip().splitlines()[-1]
    assert last.startswith(f"error: run {run_id} failed: no_sites: round 1, train: 0 of"), last
    assert "site_a: app_not_approved, site_b: app_not_approved" in last
    files = RunFiles(deployment.home, run_id)
    status = read_status(files.status_path)
    assert (status["status"], status["reason"]) == ("failed", "no_sites")
    assert status["sites"] == {name: "app_not_approved" for name in SITES}
    assert not list(files.checkpoint_dir.glob("round_*.pt"))
    assert read_rounds(files.rounds_path) == []
    events = _audit_events(files)
    assert [entry["event"] for entry in events] == ["run_submitted", "run_started", "run_failed"]
    assert events[-1]["details"]["reason"] == "no_sites"
    assert events[-1]["details"]["sites"] == status["sites"]
    assert verify_audit_log(files.audit_path).ok
    parent = MlflowClient(deployment.tracking_uri()).get_run(status["mlflow_parent_run_id"])
    assert parent.info.status == "FAILED"


def test_resume_of_a_run_whose_id_is_above_the_signed_64_bit_range(
    deployment: Deployment,
) -> None:
    # The run to resume: crashed in round 2 of 2, in the coordinator's home and MLflow.
    config = {
        **run_config_defaults(),
        **SMALL_RUN,
        "rounds": 2,
        "min-sites": len(SITES),
        "round-timeout": 600.0,
        "node-wait": 600.0,
        "run-dir": str(deployment.home),
        "tracking-uri": deployment.tracking_uri(),
    }
    nodes = {
        100 + index: {"site-config": str(write_site(deployment.root / "crashed", name, size=SIZE))}
        for index, name in enumerate(SITES)
    }
    with server_identity(BIG_RUN_ID), pytest.raises(CoordinatorCrashError):
        main(
            CrashingGrid(client_app, nodes, run_id=BIG_RUN_ID, crash_round=2),
            Context(BIG_RUN_ID, 0, {}, RecordDict(), config),
        )
    files = RunFiles(deployment.home, BIG_RUN_ID)
    assert read_status(files.status_path)["status"] == "failed"
    # The refusing sites of the previous test are gone; these approve what `run` submits.
    _wait_for_sites(deployment, 0, None)
    approved = app_bundle_hash(deployment.root / "staging")
    with ProcessGroup() as group:
        _join(group, deployment, approved)
        resumed = python_m("server", "resume", "--home", str(deployment.home), str(BIG_RUN_ID))
    assert resumed.returncode == 0, resumed.stdout
    assert f"resuming run {BIG_RUN_ID} after round 1 of 2" in resumed.stdout
    assert [entry["round"] for entry in read_rounds(files.rounds_path)] == [1, 2]
    status = read_status(files.status_path)
    assert status["status"] == "completed" and status["resumed_from_round"] == 1
    assert files.checkpoint_path(2).is_file()
    events = [entry["event"] for entry in _audit_events(files)]
    assert events[-4:] == ["run_submitted", "run_resumed", "round_completed", "run_completed"]
    assert verify_audit_log(files.audit_path).ok
    parent = MlflowClient(deployment.tracking_uri()).get_run(status["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"


def test_a_crash_nobody_followed_is_audited_and_the_restart_keeps_its_ports(
    deployment: Deployment,
) -> None:
    home = deployment.home
    submitted = python_m(
        "server", "run", "--home", str(home), "--no-follow", "--set", "node-wait=600"
    )
    assert submitted.returncode == 0, submitted.stdout
    files = RunFiles(home, _run_id(submitted.stdout))
    deadline = time.monotonic() + 300
    while (read_status(files.status_path) or {}).get("status") != "running":
        assert time.monotonic() < deadline, "the ServerApp did not start"
        time.sleep(0.5)
    superlink = int(deployment.coordinator.recorded_processes()["superlink"]["pid"])
    tree = process_tree(superlink)
    for pid in tree:  # kill -9 of the SuperLink and everything under it, ServerApp included
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(pid_alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "the SuperLink's processes did not die"
        time.sleep(0.2)

    refused = python_m(
        "server", "start", "--home", str(home), "--port", str(deployment.ports["port"] + 7)
    )
    assert refused.returncode == 2 and "--reconfigure" in refused.stdout, refused.stdout
    restarted = subprocess.run(
        documented_restart_command(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=flower_env(None),
        check=False,
    )
    assert restarted.returncode == 0, restarted.stdout
    assert f"marked run {files.run_id}: failed" in " ".join(restarted.stdout.split())
    # Back on the ports it had: the sites' port, the Control API and MLflow (reused).
    wait_http_ok(f"http://127.0.0.1:{deployment.ports['port']}/health", timeout=30)
    control = f"127.0.0.1:{deployment.ports['control-port']}"
    assert control in (deployment.coordinator.flwr_home / "config.toml").read_text()
    wait_http_ok(f"http://{control}/health", timeout=30)
    assert deployment.tracking_uri() == f"http://127.0.0.1:{deployment.ports['mlflow-port']}"
    events = _audit_events(files)
    assert [entry["event"] for entry in events] == ["run_submitted", "run_started", "run_failed"]
    failed = events[-1]
    assert failed["actor"] == events[0]["actor"]  # the operator's `server start` wrote it
    assert failed["details"]["reason"].startswith("run_lost: the SuperLink process")
    assert verify_audit_log(files.audit_path).ok
    assert read_status(files.status_path)["status"] == "failed"


def test_the_follower_names_the_lost_superlink_when_mlflow_died_with_it(
    deployment: Deployment,
) -> None:
    home = deployment.home
    log = deployment.root / "follower.log"
    outcome = kill_and_follow(home, "superlink_serverapp_mlflow", log)
    lines = log.read_text().rstrip().splitlines()
    files = RunFiles(home, str(outcome["run_id"]))
    assert outcome["exit_code"] == 1
    assert lines[-1].startswith(f"error: run {files.run_id} lost: the SuperLink (pid ")
    # Order of events: status.json and the audit log first, then the bounded MLflow close
    # (MLflow is dead: its runs stay open), then the one line naming the lost process.
    status = read_status(files.status_path)
    assert status["status"] == "failed" and status["mlflow_closed"] is False
    assert status["reason"].startswith("run_lost: the SuperLink (pid ")
    assert [entry["event"] for entry in _audit_events(files)][-1] == "run_failed"
    gave_up_on_mlflow = [
        index
        for index, line in enumerate(lines)
        if "did not answer within" in line or "could not close the MLflow runs" in line
    ]
    assert gave_up_on_mlflow and gave_up_on_mlflow[-1] < len(lines) - 1, lines
    # The documented restart brings MLflow back, and the runs it could not close get closed.
    restarted = subprocess.run(
        documented_restart_command(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=flower_env(None),
        check=False,
    )
    assert restarted.returncode == 0, restarted.stdout
    assert f"run {files.run_id}: MLflow runs closed as failed" in restarted.stdout
    status = read_status(files.status_path)
    assert status["mlflow_closed"] is True
    parent = MlflowClient(deployment.tracking_uri()).get_run(status["mlflow_parent_run_id"])
    assert parent.info.status == "FAILED"
    assert [entry["event"] for entry in _audit_events(files)].count("run_failed") == 1
