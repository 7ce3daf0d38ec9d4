"""Crash detection: seconds from ``kill -9`` until ``server run``'s follower exits.

A coordinator started as an operator would (``python -m server start``, here ``--insecure``
on loopback with free ports and no sites) runs a federation whose ServerApp waits for sites
(``node-wait`` 600 s), followed by ``python -m server run``. Once the run is ``running``,
``SIGKILL`` goes to

- (b) the ServerApp alone (``flwr-serverapp``; noticed by its stale heartbeat);
- (a) the SuperLink alone (its own process, not the SuperExec or ServerApp under it);
- (c) the SuperLink with everything under it (SuperExec, ServerApp) and the MLflow server,

in that order, and the time until the follower exits is measured; each time the follower
must exit 1 naming what was lost. After (a) and (c) the coordinator comes back with the
restart command of the docs (``python -m server start --home HOME``, no flags).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from server.checkpoint import RunFiles, read_status
from server.coordinator import Coordinator, free_port
from server.processes import flower_env, pid_alive, process_tree

__all__ = ["kill_and_follow", "run"]

#: What the follower's last line must name for each scenario.
EXPECTED = {
    "serverapp": "the ServerApp stopped: no heartbeat",
    "superlink": "the SuperLink (pid",
    "superlink_serverapp_mlflow": "the SuperLink (pid",
}


def _server(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, "-m", "server", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=flower_env(None),
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"server {args[0]} failed:\n{completed.stdout}{completed.stderr}")
    return completed


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:.0f} s")
        time.sleep(0.2)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def kill_and_follow(home: Path, scenario: str, log: Path) -> dict[str, object]:
    """Follow a new run, kill what ``scenario`` names once it runs; time the follower's exit.

    Returns
    -------
    dict
        ``seconds`` (from the kill to the follower's exit), ``run_id``, ``exit_code``,
        ``last_line`` and ``killed`` (the pids).

    Raises
    ------
    RuntimeError
        If the follower does not exit 1 with a last line naming what was lost.
    """
    coordinator = Coordinator(home)
    with open(log, "w") as stream:
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "run",
                "--home",
                str(home),
                "--set",
                "rounds=1",
                "--set",
                "node-wait=600",
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=flower_env(None),
        )
    try:
        found: list[str] = []

        def submitted() -> bool:
            found[:] = re.findall(r"submitted run (\d+)", log.read_text())
            return bool(found)

        _wait_until(submitted, 300, "the run was not submitted")
        files = RunFiles(home, found[0])
        _wait_until(
            lambda: (read_status(files.status_path) or {}).get("status") == "running",
            300,
            "the ServerApp did not start",
        )
        recorded = coordinator.recorded_processes()
        superlink = int(recorded["superlink"]["pid"])
        tree = process_tree(superlink)
        if scenario == "serverapp":
            targets = [pid for pid in tree if "flwr-serverapp" in _cmdline(pid)]
        elif scenario == "superlink":
            targets = [superlink]
        else:
            targets = tree + process_tree(int(recorded["mlflow"]["pid"]))
        if not targets:
            raise RuntimeError(f"{scenario}: nothing to kill under the SuperLink ({tree})")
        killed = time.monotonic()
        _kill(targets)
        exit_code = follower.wait(timeout=600)
        seconds = time.monotonic() - killed
        if scenario != "serverapp":
            _kill([pid for pid in tree if pid_alive(pid)])  # what outlived its SuperLink
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    lines = log.read_text().rstrip().splitlines()
    last = lines[-1] if lines else ""
    if exit_code != 1 or EXPECTED[scenario] not in last:
        raise RuntimeError(f"{scenario}: the follower ended {exit_code} with {last!r}")
    return {
        "seconds": seconds,
        "run_id": found[0],
        "exit_code": exit_code,
        "last_line": last,
        "killed": targets,
    }


def run(workdir: Path) -> dict[str, float]:
    """Detection times after ``kill -9`` of (b) the ServerApp, (a) the SuperLink, (c) all."""
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "coordinator"
    port = free_port(8200)
    _server(
        home,
        "start",
        "--insecure",
        "--port",
        str(port),
        "--control-port",
        str(free_port(port + 1)),
        "--mlflow-port",
        str(free_port(5200)),
    )
    figures: dict[str, float] = {}
    try:
        for scenario in ("serverapp", "superlink", "superlink_serverapp_mlflow"):
            outcome = kill_and_follow(home, scenario, workdir / f"follow-{scenario}.log")
            figures[f"crash_detect_{scenario}_s"] = float(outcome["seconds"])
            if scenario != "serverapp":
                _server(home, "start")  # the docs' restart line: the stored ports
    finally:
        subprocess.run(
            [sys.executable, "-m", "server", "stop", "--home", str(home)],
            capture_output=True,
            env=flower_env(None),
            check=False,
            timeout=300,
        )
    return figures
