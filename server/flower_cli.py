"""Thin wrappers around the ``flwr`` command line (submit, list, stop runs; list nodes).

The commands run with a private ``FLWR_HOME`` whose ``config.toml`` holds the ``sicfed``
connection (see :func:`server.processes.write_connection`); their JSON output is parsed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from server.processes import CONNECTION, flower_env, venv_bin
from sic_core.errors import SicfedError

__all__ = [
    "FlowerCliError",
    "connected_nodes",
    "format_run_config",
    "list_runs",
    "register_node",
    "run_info",
    "server_app_log",
    "stop_run",
    "submit_run",
]


class FlowerCliError(SicfedError):
    """A ``flwr`` command failed."""

    reason = "flower_cli_failed"


def _run_flwr(
    args: list[str], flwr_home: Path, *, timeout: float
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [str(venv_bin() / "flwr"), *args],
            env=flower_env(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise FlowerCliError(f"`flwr {' '.join(args)}` did not finish in {timeout:.0f} s") from None


def _flwr(args: list[str], flwr_home: Path, *, timeout: float = 120.0) -> dict[str, Any]:
    completed = _run_flwr(args, flwr_home, timeout=timeout)
    text = completed.stdout.strip()
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        payload = None
    if completed.returncode != 0 or not isinstance(payload, dict) or not payload.get("success"):
        detail = (payload or {}).get("error-message") if isinstance(payload, dict) else None
        # With --format json, flwr exits 0 even when it failed; say what it did report.
        how = (
            f"exit {completed.returncode}"
            if completed.returncode != 0
            else "exit 0, but its answer says it did not succeed"
        )
        raise FlowerCliError(
            f"`flwr {' '.join(args)}` failed ({how}): "
            f"{detail or (completed.stderr or completed.stdout).strip()[-2000:]}"
        )
    return payload


def format_run_config(overrides: dict[str, Any]) -> str:
    """``{"rounds": 3, "study": "demo"}`` -> ``'rounds=3 study="demo"'`` (TOML values)."""
    parts = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


def submit_run(app_dir: Path, flwr_home: Path, overrides: dict[str, Any]) -> int:
    """``flwr run APP sicfed --run-config ... --format json``; return the run id."""
    args = ["run", str(app_dir), CONNECTION, "--format", "json"]
    if overrides:
        args += ["--run-config", format_run_config(overrides)]
    payload = _flwr(args, flwr_home, timeout=300.0)
    return int(payload["run-id"])


def list_runs(flwr_home: Path) -> list[dict[str, Any]]:
    """Every run the SuperLink knows (``flwr list --format json``)."""
    return list(_flwr(["list", CONNECTION, "--format", "json"], flwr_home)["runs"])


def run_info(run_id: int, flwr_home: Path, *, timeout: float = 120.0) -> dict[str, Any]:
    """Status, timings and traffic of one run (``flwr list --run-id``), within ``timeout`` s."""
    args = ["list", CONNECTION, "--run-id", str(run_id), "--format", "json"]
    runs = _flwr(args, flwr_home, timeout=timeout)["runs"]
    if not runs:
        raise FlowerCliError(f"the SuperLink does not know run {run_id}")
    return dict(runs[0])


def server_app_log(run_id: int, flwr_home: Path, *, timeout: float = 30.0) -> str:
    """The ServerApp's own log of a run (``flwr log RUN_ID --show``; Flower keeps it).

    Raises
    ------
    FlowerCliError
        If the command fails or does not finish within ``timeout`` seconds.
    """
    args = ["log", str(run_id), CONNECTION, "--show"]
    completed = _run_flwr(args, flwr_home, timeout=timeout)
    if completed.returncode != 0:
        raise FlowerCliError(
            f"`flwr {' '.join(args)}` failed (exit {completed.returncode}): "
            f"{(completed.stderr or completed.stdout).strip()[-500:]}"
        )
    return completed.stdout


def stop_run(run_id: int, flwr_home: Path) -> None:
    """``flwr stop RUN_ID``."""
    _flwr(["stop", str(run_id), CONNECTION, "--format", "json"], flwr_home)


def connected_nodes(flwr_home: Path) -> list[dict[str, Any]]:
    """SuperNodes the SuperLink lists as online."""
    payload = _flwr(["supernode", "list", CONNECTION, "--format", "json"], flwr_home)
    nodes = payload.get("nodes", [])
    return [node for node in nodes if str(node.get("status", "")).lower() == "online"]


def register_node(public_key: Path, flwr_home: Path) -> int:
    """``flwr supernode register KEY.pub``: admit a site's key; return its node id."""
    payload = _flwr(
        ["supernode", "register", str(public_key), CONNECTION, "--format", "json"], flwr_home
    )
    return int(payload["node-id"])
