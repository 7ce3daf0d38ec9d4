"""The coordinator's machinery shared by ``start``, ``run``, ``status``, ``stop`` and ``demo``.

A coordinator home folder holds everything of one federation deployment::

    HOME/coordinator.json     addresses of the SuperLink (site-facing) and the MLflow server
    HOME/tls/                 CA and server certificate (`python -m server certs`)
    HOME/sites.json           registered sites: name, key fingerprint, time, node id
    HOME/pids.json            processes started by `start` (read by `stop` and `status`)
    HOME/flwr/                private FLWR_HOME (config.toml with the `sicfed` connection)
    HOME/superlink/state.db   the SuperLink's state database
    HOME/mlflow/mlflow.db     MLflow backend store (sqlite); artifacts in HOME/mlflow/artifacts
    HOME/checkpoints/, runs/  what the ServerApp writes per run (run-dir = HOME)
    HOME/logs/                one log file per process
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from server.checkpoint import RunFiles, read_rounds, read_status
from server.flower_cli import run_info, submit_run
from server.processes import (
    ManagedProcess,
    ProcessGroup,
    ProcessStartError,
    flower_env,
    log_tail,
    pid_alive,
    venv_bin,
    wait_http_ok,
    write_connection,
)
from server.run_watch import RunLostError, liveness_problem, strip_ansi
from server.staging import stage_app
from server.tls import TlsFiles
from sic_core.errors import SicfedError

__all__ = [
    "Coordinator",
    "CoordinatorAddresses",
    "RunOutcome",
    "follow_run",
    "free_port",
    "round_table",
    "start_mlflow",
    "start_superlink",
]

#: How often the SuperExecs we start look for new tasks (Flower's default: 1 s).
TASK_POLL_INTERVAL = 0.1


def free_port(preferred: int, host: str = "127.0.0.1") -> int:
    """``preferred`` if nothing listens there, else a free ephemeral port."""
    for port in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise ProcessStartError(f"no free TCP port on {host}")


@dataclass(frozen=True)
class CoordinatorAddresses:
    """Where the coordinator's services listen."""

    superlink: str
    tracking_uri: str


class Coordinator:
    """Paths of a coordinator home (see the module docstring)."""

    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.flwr_home = self.home / "flwr"
        self.superlink_db = self.home / "superlink" / "state.db"
        self.mlflow_dir = self.home / "mlflow"
        self.logs = self.home / "logs"
        self.pid_file = self.home / "pids.json"
        self.address_file = self.home / "coordinator.json"
        self.tls = TlsFiles(self.home / "tls")
        self.roster_file = self.home / "sites.json"

    def save_addresses(self, addresses: CoordinatorAddresses) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.address_file.write_text(json.dumps(asdict(addresses), indent=2))

    def addresses(self) -> CoordinatorAddresses:
        """The addresses written by ``start`` (``ProcessStartError`` if not started)."""
        if not self.address_file.exists():
            raise ProcessStartError(
                f"{self.home} has no running coordinator; run `python -m server start "
                f"--home {self.home}` first"
            )
        return CoordinatorAddresses(**json.loads(self.address_file.read_text()))

    def recorded_processes(self) -> dict[str, dict[str, Any]]:
        """``name -> {pid, log}`` from the pid file (empty if none)."""
        if not self.pid_file.exists():
            return {}
        return dict(json.loads(self.pid_file.read_text()))

    def superlink_alive(self) -> bool:
        """Whether the SuperLink that ``start`` recorded is running."""
        info = self.recorded_processes().get("superlink")
        return info is not None and pid_alive(int(info["pid"]))

    def check_superlink(self) -> None:
        """Raise :class:`RunLostError` naming the SuperLink's last log line if it is gone."""
        if self.superlink_alive():
            return
        info = self.recorded_processes().get("superlink", {})
        last = strip_ansi(log_tail(Path(info["log"]), lines=1)) if info.get("log") else ""
        raise RunLostError(
            f"the SuperLink (pid {info.get('pid', '?')}) is not running"
            + (f"; its log ends with: {last.strip()}" if last.strip() else "")
        )


def start_mlflow(group: ProcessGroup, mlflow_dir: Path, *, port: int, log_path: Path) -> str:
    """Start ``mlflow server`` (sqlite store, served artifacts) on loopback; return its URI.

    The server's background job runner is switched off (it would start a dozen worker
    processes that a federation does not use). Poll ``/health`` before using it: its first
    start migrates the database, which takes tens of seconds on a busy machine.
    """
    mlflow_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(venv_bin() / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination",
        str(mlflow_dir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = flower_env(mlflow_dir, extra={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    group.start("mlflow", argv, log_path=log_path, env=env, cwd=mlflow_dir)
    return f"http://127.0.0.1:{port}"


def start_superlink(
    group: ProcessGroup,
    coordinator: Coordinator,
    *,
    port: int,
    host: str = "127.0.0.1",
    control_port: int | None = None,
    tls: TlsFiles | None = None,
    site_auth: bool = False,
    timeout: float = 60.0,
    task_poll_interval: float | None = TASK_POLL_INTERVAL,
) -> tuple[str, ManagedProcess]:
    """Start the SuperLink (state database, two listeners); wait for ``/health``.

    Sites reach only the Fleet API on ``host:port``; the Control and Runtime APIs listen on
    ``127.0.0.1:control_port`` (a free port if ``None``), which the coordinator's ``flwr``
    connection (``HOME/flwr/config.toml``) uses. See :mod:`server.superlink_listeners`.

    Parameters
    ----------
    tls
        The coordinator's certificates; ``None`` runs without TLS (loopback tests only).
    site_auth
        Admit only SuperNodes whose key was registered (needs ``tls``).
    task_poll_interval
        How often the SuperExec looks for a ServerApp to launch (``None``: Flower's 1 s).

    Returns
    -------
    tuple
        The site-facing Fleet API address (``host:port``) and the process.
    """
    if site_auth and tls is None:
        raise ProcessStartError("site authentication needs TLS (Flower signs over TLS only)")
    coordinator.superlink_db.parent.mkdir(parents=True, exist_ok=True)
    control_port = free_port(port + 1) if control_port is None else control_port
    argv = [
        sys.executable,
        "-I",  # no module of this checkout may shadow what Flower imports
        str(Path(__file__).resolve().parent / "superlink_listeners.py"),
        "--site-address",
        f"{host}:{port}",
        "--",
        "--database",
        str(coordinator.superlink_db),
        "--host",
        "127.0.0.1",
        "--port",
        str(control_port),
        "--disable-runtime-dependency-installation",
    ]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if site_auth:
        argv.append("--enable-supernode-auth")
    env = flower_env(coordinator.flwr_home, task_poll_interval=task_poll_interval)
    process = group.start(
        "superlink",
        argv,
        log_path=coordinator.logs / "superlink.log",
        env=env,
        cwd=coordinator.home,
    )
    control = f"127.0.0.1:{control_port}"
    ca = tls.ca_cert if tls else None
    write_connection(coordinator.flwr_home, control, root_certificates=ca)
    scheme = "https" if tls else "http"
    wait_http_ok(f"{scheme}://{control}/health", timeout=timeout, process=process, ca=ca)
    # A wildcard bind is reached on loopback too; a named address only as itself.
    site_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    wait_http_ok(f"{scheme}://{site_host}:{port}/health", timeout=timeout, process=process, ca=ca)
    return f"{host}:{port}", process


def start_site(
    group: ProcessGroup,
    site_yaml: Path,
    *,
    name: str,
    superlink: str,
    port: int,
    log_path: Path,
    poll_interval: float,
    threads: int | None = None,
    warm: bool = True,
    task_poll_interval: float | None = TASK_POLL_INTERVAL,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    worker: bool | None = None,
) -> ManagedProcess:
    """Start one site's SuperNode through ``python -m client join`` on loopback.

    ``poll_interval`` is the SuperNode's fleet polling, ``task_poll_interval`` its
    SuperExec's (``None``: Flower's 1 s); ``warm`` forks ClientApps from a warm launcher.
    Without ``root_certificates`` the site joins ``--insecure``; ``auth_key`` is its private
    key when the SuperLink authenticates sites. The site runs only the apps its config
    approves (``federation.approved_apps``). ``worker`` chooses ``join --worker`` or
    ``--no-worker`` (``None``: join's default, on for a GPU site).
    """
    argv = [
        sys.executable,
        "-m",
        "client",
        "join",
        "--site",
        str(site_yaml),
        "--superlink",
        superlink,
        "--local-port",
        str(port),
        "--poll-interval",
        str(poll_interval),
    ]
    argv += ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_key is not None:
        argv += ["--auth-key", str(auth_key)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if not warm:
        argv.append("--cold")
    if worker is not None:
        argv.append("--worker" if worker else "--no-worker")
    env = flower_env(None, task_poll_interval=task_poll_interval)
    return group.start(f"site-{name}", argv, log_path=log_path, env=env, cwd=_project_root())


def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunOutcome:
    """How a submitted run ended."""

    run_id: int
    status: str
    rounds: list[dict[str, Any]]
    seconds: float


def submit(coordinator: Coordinator, overrides: dict[str, Any], *, staging_parent: Path) -> int:
    """Stage the app and submit a run; ``run-dir`` defaults to the coordinator home."""
    app_dir = stage_app(staging_parent)
    overrides = {"run-dir": str(coordinator.home), **overrides}
    return submit_run(app_dir, coordinator.flwr_home, overrides)


def follow_run(
    coordinator: Coordinator,
    run_id: int,
    *,
    run_dir: Path,
    on_round: Callable[[dict[str, Any]], None],
    timeout: float,
    check: Callable[[], None] | None = None,
    poll_interval: float = 1.0,
    flower_poll_interval: float = 5.0,
    unreachable_after: float = 20.0,
    log_run_id: int | None = None,
) -> RunOutcome:
    """Wait for a run to finish, calling ``on_round`` for each round as it completes.

    Parameters
    ----------
    coordinator
        The coordinator (for ``flwr list``).
    run_id
        Flower run id.
    run_dir
        The run's ``run-dir`` (where ``rounds.jsonl`` and ``status.json`` appear).
    on_round
        Called with each new ``rounds.jsonl`` entry.
    timeout
        Seconds before giving up (the run is then stopped by the caller).
    check
        Called every poll; raise to abort (e.g. the SuperLink process died).
    poll_interval
        Seconds between two looks at the run's files.
    flower_poll_interval
        Seconds between two ``flwr list`` calls.
    unreachable_after
        Seconds the SuperLink may fail to answer ``flwr list`` before the run counts as lost.
    log_run_id
        The run whose files the ServerApp writes (a resumed run writes into the original
        run's); default ``run_id``.

    Raises
    ------
    RunLostError
        When the ServerApp's heartbeat goes stale while ``status.json`` says ``running``,
        or the SuperLink does not answer for ``unreachable_after`` seconds.
    ProcessStartError
        When ``timeout`` passes.
    """
    files = RunFiles(run_dir, log_run_id or run_id)
    seen = 0
    started = time.monotonic()
    last_flower_check = -flower_poll_interval
    last_answer = started
    flower_status = ""
    while True:
        rounds = read_rounds(files.rounds_path)
        for entry in rounds[seen:]:
            on_round(entry)
        seen = len(rounds)
        status = read_status(files.status_path) or {}
        # Before asking Flower: `flwr list` against a dead SuperLink takes seconds to fail.
        if check is not None:
            check()
        now = time.monotonic()
        if now - last_flower_check >= flower_poll_interval:
            last_flower_check = now
            try:
                flower_status = str(run_info(run_id, coordinator.flwr_home).get("status", ""))
                last_answer = now
            except SicfedError as error:
                if now - last_answer > unreachable_after:
                    raise RunLostError(
                        f"the SuperLink has not answered for {now - last_answer:.0f} s: {error}"
                    ) from None
        if flower_status.startswith("finished"):
            final = read_rounds(files.rounds_path)
            for entry in final[seen:]:
                on_round(entry)
            outcome = (read_status(files.status_path) or {}).get("status", "failed")
            # A ServerApp killed from outside ends "completed" in Flower's eyes but never
            # records its own outcome (status.json still says "running").
            if not flower_status.endswith("completed") or outcome != "completed":
                outcome = "failed"
            return RunOutcome(run_id, outcome, final, now - started)
        if status.get("status") == "running":
            cause = liveness_problem(files, superlink_alive=True)
            if cause is not None:
                raise RunLostError(cause)
        if now - started > timeout:
            raise ProcessStartError(f"run {run_id} did not finish within {timeout:.0f} s")
        time.sleep(poll_interval)


def round_table(rounds: list[dict[str, Any]], title: str = "Federation rounds") -> Table:
    """A rich table: one row per round, mean site AUROC and each site's validation AUROC.

    A site that failed shows its reason code; ``n/a`` marks a split without both outcomes.
    The failures column also lists accepted replies with a note (``update_clipped``).
    """
    sites = sorted(
        {row["site"] for entry in rounds for row in entry.get("sites", {}).get("evaluate", [])}
    )
    table = Table(title=title, caption="validation AUROC per site (site-local supports)")
    table.add_column("round", justify="right")
    table.add_column("mean", justify="right")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("loss", justify="right")
    table.add_column("failures")
    table.add_column("s", justify="right")
    for entry in rounds:
        summary = entry.get("summary", {})
        per_site = {row["site"]: row for row in entry.get("sites", {}).get("evaluate", [])}
        cells = [str(entry["round"]), _fmt(summary.get("perf/mean_site_auroc"))]
        for site in sites:
            row = per_site.get(site)
            if row is None:
                cells.append("-")
            elif row["status"] != "ok":
                cells.append(row["reason"])
            elif row["metrics"].get("val.auroc-defined", 1) < 1:
                cells.append("n/a")
            else:
                cells.append(_fmt(row["metrics"].get("val.auroc")))
        problems = [
            f"{row['site']}:{phase}:{row['reason']}"
            for phase, rows in entry.get("sites", {}).items()
            for row in rows
            if row["status"] != "ok" or row["reason"]
        ]
        cells += [
            _fmt(summary.get("train/loss"), digits=4),
            ", ".join(problems) or "-",
            f"{entry.get('seconds', 0):.0f}",
        ]
        table.add_row(*(Text(cell) for cell in cells))  # Text: no markup, no :emoji: codes
    return table


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
