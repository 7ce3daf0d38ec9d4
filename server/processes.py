"""Starting, watching and stopping the processes of a federation on this machine.

Every process is started in its own session (process group), so that stopping it also stops
the helpers Flower spawns under it (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``). Waits are bounded; a process that dies while we wait for it is reported
with the tail of its log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sic_core.errors import SicfedError

__all__ = [
    "ManagedProcess",
    "ProcessGroup",
    "ProcessStartError",
    "flower_env",
    "log_tail",
    "pid_alive",
    "process_tree",
    "stop_pid_group",
    "venv_bin",
    "wait_http_ok",
    "write_connection",
]

log = logging.getLogger(__name__)

#: Name of the connection the CLI writes into ``$FLWR_HOME/config.toml``.
CONNECTION = "sicfed"


class ProcessStartError(SicfedError):
    """A process exited or did not become ready in time."""

    reason = "process_start_failed"


def venv_bin() -> Path:
    """The folder of this Python's console scripts (``flower-superlink``, ``flwr``, ...)."""
    return Path(sys.executable).parent


def flower_env(
    flwr_home: Path | None,
    *,
    task_poll_interval: float | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for every Flower process we start.

    Parameters
    ----------
    flwr_home
        Private ``FLWR_HOME`` (apps, connections, logs); ``None`` leaves it to the process
        (``python -m client join`` picks the site's state folder).
    task_poll_interval
        ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``: how often a SuperExec looks for new work
        (Flower's default is 1 s).
    extra
        Further variables.
    """
    env = dict(os.environ)
    env.update(
        {
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{venv_bin()}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    else:
        env.pop("FLWR_HOME", None)
    if task_poll_interval is not None:
        env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll_interval)
    env.update(extra or {})
    return env


def write_connection(
    flwr_home: Path, address: str, *, root_certificates: Path | None = None
) -> str:
    """Write the ``sicfed`` connection into ``$FLWR_HOME/config.toml``; return its name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [f"[superlink.{CONNECTION}]", f'address = "{address}"']
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates.resolve()}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")
    return CONNECTION


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' if it does not exist)."""
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


def _parents() -> dict[int, int]:
    """``pid -> parent pid`` of every process (from ``/proc``)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (children first found, depth-first)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    own_group = os.getpgrp()
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except (ProcessLookupError, PermissionError):
            continue
    for group in groups - {own_group}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_pid_group(pid: int, *, timeout: float = 10.0) -> None:
    """Stop ``pid``, its process group and every descendant (some Flower helpers start
    their own session): SIGTERM, then SIGKILL what is still alive after ``timeout``."""
    targets = process_tree(pid)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        alive = [p for p in targets if pid_alive(p)]
        if not alive:
            return
        _signal_all(alive, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(pid_alive(p) for p in alive):
            time.sleep(0.1)


@dataclass
class ManagedProcess:
    """A process we started: its name, handle and log file."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and everything in its process group."""
        stop_pid_group(self.pid, timeout=timeout)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not exit", self.name, self.pid)


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: dict[str, str] | None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session with stdout and stderr going to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as stream:
        process = subprocess.Popen(
            list(argv),
            stdout=stream,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    log.info("started %s (pid %d): %s", name, process.pid, " ".join(argv))
    return ManagedProcess(name=name, process=process, log_path=log_path)


def wait_http_ok(
    url: str,
    *,
    timeout: float,
    process: ManagedProcess | None = None,
    ca: Path | None = None,
) -> float:
    """Poll ``url`` until it answers 200; return the seconds it took.

    ``ca`` is the CA certificate to verify an ``https`` URL against.

    Raises
    ------
    ProcessStartError
        If ``process`` exits first or ``timeout`` passes (with the tail of its log).
    """
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    started = time.monotonic()
    while True:
        if process is not None and not process.alive():
            raise ProcessStartError(
                f"{process.name} exited with code {process.process.returncode} before "
                f"{url} answered; its log ({process.log_path}) ends with:\n"
                f"{log_tail(process.log_path)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() - started > timeout:
            tail = f"; its log ends with:\n{log_tail(process.log_path)}" if process else ""
            raise ProcessStartError(f"{url} did not answer within {timeout:.0f} s{tail}")
        time.sleep(0.25)


class ProcessGroup:
    """Processes started together and stopped together (also on Ctrl-C and on failure).

    Use as a context manager; :meth:`stop_all` stops in reverse start order.
    """

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start a process and remember it."""
        managed = start_process(name, argv, log_path=log_path, env=env, cwd=cwd)
        self.processes.append(managed)
        return managed

    def check_alive(self) -> None:
        """Raise ``ProcessStartError`` if any process has exited."""
        for managed in self.processes:
            if not managed.alive():
                raise ProcessStartError(
                    f"{managed.name} exited with code {managed.process.returncode}; its log "
                    f"({managed.log_path}) ends with:\n{log_tail(managed.log_path)}"
                )

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every process (reverse order), each with its process group."""
        for managed in reversed(self.processes):
            managed.stop(timeout=timeout)
        self.processes.clear()

    def pids(self) -> dict[str, int]:
        """``name -> pid`` of the processes started (for pid files)."""
        return {managed.name: managed.pid for managed in self.processes}

    def write_pid_file(self, path: Path, *, keep: dict[str, dict] | None = None) -> None:
        """Record the processes' ids (``stop`` reads it), plus the entries in ``keep``
        (processes an earlier ``start`` launched that still run)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(keep or {})
        payload.update(
            {
                managed.name: {"pid": managed.pid, "log": str(managed.log_path)}
                for managed in self.processes
            }
        )
        path.write_text(json.dumps(payload, indent=2))

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop_all()
