"""``python -m client join``: connect this site to a federation as a Flower SuperNode.

Validates the site config, prepares the site's data cache (so the first round does not
decode DICOM under a deadline), then runs ``flower-supernode`` in this process with the site
config as its node config and a private ``FLWR_HOME`` in the site's state folder. Heavy
imports happen inside the command so that ``--help`` stays fast.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import time
import types
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from client.app_approval import ALLOW_ANY, APPROVED_APPS_ENV, SITE_NAME_ENV
from sic_core.cli_vocabulary import POLL_INTERVAL_SECONDS, deprecated_option

__all__ = [
    "FLOWER_POLL_SECONDS",
    "WARM_MODULES",
    "join",
    "shorten_fleet_polling",
    "start_site_worker",
    "start_warm_launcher",
    "supernode_argv",
    "write_guarded_clientapp",
]

console = Console(stderr=True)

#: How long Flower 1.41's SuperNode sleeps between two pulls when no message is waiting
#: (hard-coded in ``flwr.supernode.start_client_internal``).
FLOWER_POLL_SECONDS = 3.0


def shorten_fleet_polling(interval: float) -> None:
    """Make this process's SuperNode ask the SuperLink for work every ``interval`` seconds.

    Flower 1.41 has no setting for the SuperNode's fleet polling: its main loop calls
    ``time.sleep(3)`` after every empty pull. This replaces the ``time`` module seen by that
    loop (and only by it) with one whose ``sleep`` is capped at ``interval``. Each site then
    picks up a message within ``interval`` instead of within 3 s, at the cost of
    ``1 / interval`` pull requests per second to the SuperLink.

    Raises
    ------
    RuntimeError
        If the installed Flower no longer has the loop this targets.
    """
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        raise RuntimeError(
            "flwr.supernode.start_client_internal does not use the `time` module (a newer "
            "Flower, or already shortened): cannot shorten the SuperNode's polling"
        )
    real_sleep = time.sleep

    def capped_sleep(seconds: float) -> None:
        real_sleep(min(seconds, interval))

    members = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    members["sleep"] = capped_sleep
    loop.time = types.SimpleNamespace(**members)  # type: ignore[assignment]


#: The app approval gate every ClientApp process loads by path (:mod:`client.app_approval`).
_GATE = Path(__file__).resolve().parent.parent / "app_approval.py"

#: Third-party modules a warm launcher imports once (never project modules: every ClientApp
#: must import ``client``, ``server`` and ``sic_core`` from the app bundle it was sent).
WARM_MODULES = (
    "numpy",
    "torch",
    "torchvision",
    "torchvision.models",
    "torchvision.ops",
    "bcos",
    "bcos.modules",
    "sklearn.cluster",
    "monai",
    "monai.data",
    "monai.transforms",
    "pydicom",
    "PIL.Image",
    "yaml",
    "pydantic",
    "opacus",
    "rich",
    "flwr.clientapp",
    "flwr.supernode.cli.flwr_clientapp",
)

_LAUNCHER = """\
import importlib, importlib.util, json, os, signal, socket, sys

address, gate_path, parent = sys.argv[1], sys.argv[2], os.getppid()
for name in sys.argv[3:]:
    try:
        importlib.import_module(name)
    except Exception as error:  # an optional module missing only costs import time later
        print(f"warm launcher: cannot preload {name}: {error}", file=sys.stderr)
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\\0" + address)
server.listen(16)
server.settimeout(1.0)
while os.getppid() == parent:  # exit with the SuperNode
    try:
        conn, _ = server.accept()
    except TimeoutError:
        continue
    with conn:
        conn.settimeout(10.0)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        request = json.loads(data)
        pid = os.fork()
        if pid == 0:
            server.close()
            conn.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            # The site's app approval gate, before anything of the bundle is installed.
            spec = importlib.util.spec_from_file_location("sicfed_app_approval", gate_path)
            gate = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(gate)
            gate.install_guard_from_environment()
            sys.argv = ["flwr-clientapp", *request["args"]]
            code = 1
            try:
                flwr_clientapp()
                code = 0
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        conn.sendall(str(pid).encode())
"""

_SHIM = """\
#!{python} -IS
# flwr-clientapp for the warm launcher of site {site}: hands the launch to the launcher and
# falls back to a cold start if the launcher does not answer.
import json, os, socket, sys, time

request = json.dumps(
    {{"args": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}}
).encode()
for _ in range(50):
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect("\\0{address}")
        break
    except OSError:
        time.sleep(0.1)
else:
    os.execv({cold!r}, [{cold!r}, *sys.argv[1:]])
connection.sendall(request)
connection.shutdown(socket.SHUT_WR)
connection.recv(64)
"""


_GUARDED_CLIENTAPP = """\
#!{python} -I
# flwr-clientapp of site {site}: the site's app approval gate, then Flower's ClientApp
# process (-I: nothing of the site's checkout is importable in place of the app bundle).
import importlib.util, sys

spec = importlib.util.spec_from_file_location("sicfed_app_approval", {gate!r})
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)
gate.install_guard_from_environment()
from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

sys.argv[0] = "flwr-clientapp"
sys.exit(flwr_clientapp())
"""


def _write_executable(path: Path, text: str) -> None:
    """Write beside ``path`` and rename over it, executable: a SuperNode (or a test) that
    sees the file never finds it half-written or not yet executable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(text)
    staged.chmod(0o755)
    os.replace(staged, path)


def write_guarded_clientapp(path: Path, site: str) -> Path:
    """Write a ``flwr-clientapp`` that runs the site's app approval gate first.

    The gate (:mod:`client.app_approval`, loaded by path from this checkout) refuses a bundle
    whose hash the site did not approve before Flower installs or imports it.
    """
    _write_executable(
        path, _GUARDED_CLIENTAPP.format(python=sys.executable, site=site, gate=str(_GATE))
    )
    return path


def start_warm_launcher(
    folder: Path, site: str, *, modules: tuple[str, ...] = WARM_MODULES
) -> subprocess.Popen:
    """Start a launcher that forks ClientApp processes with heavy libraries already loaded.

    Flower starts a new ``flwr-clientapp`` process for every message; importing torch,
    MONAI and scikit-learn takes most of each one's life (tens of seconds on a busy CPU).
    The launcher imports :data:`WARM_MODULES` once and forks a child per message that runs
    ``flwr-clientapp`` unchanged (the app itself still comes from the bundle the message
    belongs to), after the site's app approval gate. ``folder/bin/flwr-clientapp`` is a
    shim that hands each launch to it (or starts a gated cold one if it does not answer); put
    ``folder/bin`` first on ``PATH`` before starting the SuperNode. The launcher exits with
    its parent; its output (and every ClientApp's) goes to this process's stdout.
    """
    address = f"sicfed-{site}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = folder / "warm_launcher.py"
    launcher.write_text(_LAUNCHER)
    cold = str(write_guarded_clientapp(folder / "cold-clientapp", site))
    _write_executable(
        bin_dir / "flwr-clientapp",
        _SHIM.format(python=sys.executable, site=site, address=address, cold=cold),
    )
    # -I: the launcher must not see the checkout (no project module may be preloaded).
    return subprocess.Popen([sys.executable, "-I", str(launcher), address, str(_GATE), *modules])


#: Longest Unix socket path the kernel accepts, minus a margin.
_SOCKET_PATH_LIMIT = 100
_WORKER_START_SECONDS = 600.0


def start_site_worker(site_yaml: Path, state_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Start the site worker (:mod:`client.site_worker`) and wait until it listens.

    Returns the process and its socket (``state_dir/worker/site.sock``, or a private
    temporary folder where that path is too long for a Unix socket).

    Raises
    ------
    RuntimeError
        If the worker exits before it listens (its error is in this process's output).
    """
    import tempfile

    from client.site_worker import worker_socket_path

    path = worker_socket_path(state_dir).resolve()
    if len(str(path)) > _SOCKET_PATH_LIMIT:
        path = Path(tempfile.mkdtemp(prefix="sicfed-worker-")) / "site.sock"
    path.unlink(missing_ok=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "client.site_worker", str(site_yaml.resolve()), str(path)],
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + _WORKER_START_SECONDS
    while not path.exists():
        if worker.poll() is not None:
            raise RuntimeError(f"the site worker exited with code {worker.returncode}")
        if time.monotonic() > deadline:
            worker.terminate()
            raise RuntimeError("the site worker did not start listening in time")
        time.sleep(0.1)
    return worker, path


def supernode_argv(
    *,
    site_yaml: Path,
    superlink: str,
    port: int,
    insecure: bool,
    root_certificates: Path | None,
    auth_key: Path | None,
) -> list[str]:
    """Command-line arguments of ``flower-supernode`` for one site."""
    from client.app import SITE_CONFIG_KEY

    argv = ["flower-supernode", "--superlink", superlink, "--port", str(port)]
    if insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(root_certificates)]
    if auth_key is not None:
        argv += ["--auth-supernode-private-key", str(auth_key)]
    argv += ["--node-config", f'{SITE_CONFIG_KEY}="{site_yaml.resolve()}"']
    return argv


def _check_site_data(site_yaml: Path, *, load: bool, allow_empty: bool) -> None:
    """Check (and, with ``load``, cache) the site's data; exit 1 naming every problem.

    Without ``load`` only the configured paths are checked (no decoding). With
    ``allow_empty`` the problems are printed as warnings and the site joins anyway.
    """
    from client.config import load_site_config
    from client.data.readiness import missing_data_sources, readiness_problems

    config = load_site_config(site_yaml)
    problems = missing_data_sources(config)
    if load and not problems:
        from client.data import load_site_data

        data = load_site_data(config, progress=True)
        table = Table(title=f"Site {config.name}: data")
        table.add_column("split")
        for name in data.class_names:
            table.add_column(name, justify="right")
        for split, per_class in data.counts().items():
            table.add_row(split, *(str(per_class[name]) for name in data.class_names))
        console.print(table)
        if data.quarantine_counts:
            console.print(f"skipped files by reason: {data.quarantine_counts}")
        for warning in data.warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        problems = readiness_problems(config, data)
    if not problems:
        return
    for problem in problems:
        label = "[yellow]warning (--allow-empty):[/]" if allow_empty else "[red]cannot train:[/]"
        console.print(f"{label} {site_yaml}: {problem}", soft_wrap=True)
    if not allow_empty:
        console.print(
            f"Site {config.name} does not join: fix its data (`python -m client check --site "
            f"{site_yaml}` lists skipped files) or give --allow-empty to join anyway",
            soft_wrap=True,
        )
        raise typer.Exit(1)


def join(
    site: Annotated[
        Path, typer.Option("--site", help="The site's YAML config.", exists=True, dir_okay=False)
    ],
    superlink: Annotated[
        str, typer.Option(help="SuperLink Fleet API address, HOST:PORT.")
    ] = "127.0.0.1:8000",
    local_port: Annotated[
        int,
        typer.Option(help="This SuperNode's local Runtime API port (one per site on a machine)."),
    ] = 9094,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS (loopback demos and tests only).")
    ] = False,
    root_certificates: Annotated[
        Path | None,
        typer.Option(
            help="CA certificate that signed the SuperLink's certificate (TLS).", exists=True
        ),
    ] = None,
    auth_key: Annotated[
        Path | None,
        typer.Option(
            help="This site's private key (from `python -m client keygen`); the coordinator "
            "registers its .pub file.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    allow_any_app: Annotated[
        bool,
        typer.Option(
            "--allow-any-app",
            help="Run any app bundle the coordinator sends, approved or not (development "
            "only; default: only the hashes in federation.approved_apps).",
        ),
    ] = False,
    flwr_home: Annotated[
        Path | None, typer.Option(help="Private FLWR_HOME (default: <state_dir>/flwr).")
    ] = None,
    poll_interval: Annotated[
        float,
        typer.Option(
            min=0.05,
            help="Seconds between the SuperNode's requests for work (Flower's own is a fixed "
            "3 s; each request is one HTTP call to the SuperLink).",
        ),
    ] = POLL_INTERVAL_SECONDS,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads of each ClientApp process (OMP_NUM_THREADS)."),
    ] = None,
    prepare: Annotated[
        bool,
        typer.Option(
            help="Load (and cache) the site's data before connecting (--no-prepare: only "
            "check that its data paths exist)."
        ),
    ] = True,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Join even if the site's data cannot train (missing data root, no training "
            "or validation images, labels outside the class list); the site then fails "
            "its rounds.",
        ),
    ] = False,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm/--cold",
            help="Fork each ClientApp from a launcher with torch, MONAI and scikit-learn "
            "already imported (--cold: Flower's fresh process per message).",
        ),
    ] = True,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker",
            help="Compute in one site worker that owns the device and the decoded data for "
            "the whole join, with each ClientApp forwarding its message to it over a socket "
            "only this user can open (default: on when compute.device is a GPU, off on a "
            "CPU).",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(hidden=True, callback=deprecated_option("--port", "--local-port")),
    ] = None,
) -> None:
    """Join a federation: start this site's Flower SuperNode.

    First checks the compute device: a GPU that compute.device asks for but this machine
    lacks stops the join with exit code 2 naming the field and what was found. Then checks
    the site's data: a missing data root, no training or validation images, or
    labels outside the class list stop the join with exit code 1 naming the problem (unless
    --allow-empty). Before connecting, checks that the TLS settings fit the SuperLink (a
    wrong CA or TLS mode stops here with one line naming the cause). Every app bundle the
    coordinator sends must be approved first: its hash in the site's
    federation.approved_apps (`python -m client approve`); anything else is refused with
    app_not_approved before any of it runs.

    Examples
    --------
    python -m client join --site site.yaml --superlink coordinator.example:8000 \
        --root-certificates ca.crt --auth-key keys/site_ecdsa
    python -m client join --site demo/sites/site_a/site.yaml --insecure --allow-any-app
    python -m client join --site site.yaml --insecure --allow-any-app --allow-empty
    """
    from client.config import load_site_config
    from client.device import describe_device, site_device
    from sic_core.errors import ConfigError, SicfedError

    local_port = local_port if port is None else port
    try:
        config = load_site_config(site)
        try:
            device = site_device(config)
        except ConfigError as error:
            raise ConfigError(f"{site}: {error}") from None
        console.print(f"Compute device: {describe_device(device)}")
        if not insecure and root_certificates is None:
            raise typer.BadParameter(
                "give --root-certificates (TLS) or --insecure (loopback only)",
                param_hint="--root-certificates",
            )
        if not config.federation.approved_apps and not allow_any_app:
            raise typer.BadParameter(
                f"{site}: federation.approved_apps is empty, so no app could run here; "
                "approve the coordinator's app (`python -m client approve --site "
                f"{site} --app-hash sha256:...`) or give --allow-any-app (development only)",
                param_hint="--allow-any-app",
            )
        _check_site_data(site, load=prepare, allow_empty=allow_empty)
        _wait_for_superlink(superlink, root_certificates if not insecure else None)
    except SicfedError as error:
        console.print(f"[red]error:[/] {error.reason}: {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    home = (flwr_home or Path(config.state_dir) / "flwr").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            APPROVED_APPS_ENV: ALLOW_ANY
            if allow_any_app
            else " ".join(config.federation.approved_apps),
            SITE_NAME_ENV: config.name,
        }
    )
    if allow_any_app:
        console.print("[yellow]warning:[/] --allow-any-app: this site runs any app it is sent")
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if worker if worker is not None else device.type == "cuda":
        from client.site_worker import WORKER_ENV

        try:
            process, address = start_site_worker(site, Path(config.state_dir))
        except RuntimeError as error:
            console.print(f"[red]error:[/] site_worker_failed: {error}", soft_wrap=True)
            raise typer.Exit(2) from None
        atexit.register(process.terminate)
        os.environ[WORKER_ENV] = str(address)
        console.print(f"Site worker on {describe_device(device)} (socket {address})")
    launch = home / "launch"
    if warm:
        launcher = start_warm_launcher(launch, config.name)
        atexit.register(launcher.terminate)
    else:
        write_guarded_clientapp(launch / "bin" / "flwr-clientapp", config.name)
    # Flower starts `flwr-clientapp` from PATH: ours first, with the approval gate.
    os.environ["PATH"] = f"{launch / 'bin'}{os.pathsep}{os.environ['PATH']}"
    if poll_interval < FLOWER_POLL_SECONDS:
        shorten_fleet_polling(poll_interval)
    sys.argv = supernode_argv(
        site_yaml=site,
        superlink=superlink,
        port=local_port,
        insecure=insecure,
        root_certificates=root_certificates,
        auth_key=auth_key,
    )
    # Flower logs through its own console handler; keep its lines (and every HTTP poll of
    # httpx) out of the CLI's root handler.
    flower_log = logging.getLogger("flwr")
    flower_log.propagate = False
    refusal = _AuthRefusalWatch()
    flower_log.addHandler(refusal)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    console.print(f"Site [bold]{config.name}[/] joining {superlink} (FLWR_HOME={home})")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    try:
        flower_supernode()
    except SystemExit:
        if refusal.code is not None:
            console.print(f"[red]error:[/] {refusal.explain(auth_key)}", soft_wrap=True)
            raise typer.Exit(3) from None
        raise


def _wait_for_superlink(address: str, root_certificates: Path | None) -> None:
    """Probe the SuperLink until it answers; a TLS mismatch raises at once."""
    from client.superlink_probe import SuperLinkUnreachableError, probe_superlink

    announced = False
    while True:
        try:
            probe_superlink(address, root_certificates=root_certificates)
            return
        except SuperLinkUnreachableError as error:
            if not announced:
                console.print(f"{error}; retrying until it answers")
                announced = True
            time.sleep(2.0)


class _AuthRefusalWatch(logging.Handler):
    """Notices the SuperLink refusing this site's identity in Flower's exit message.

    Flower 1.41 ends the SuperNode with exit code 305 for every failed first connection; the
    Flower error code inside its message tells a missing key (2001) from a key the
    coordinator never registered (2004).
    """

    MISSING_KEY = "2001"
    UNREGISTERED_KEY = "2004"

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.code: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for code in (self.MISSING_KEY, self.UNREGISTERED_KEY):
            if f"[code: {code}]" in text:
                self.code = code

    def explain(self, auth_key: Path | None) -> str:
        """One line naming the cause."""
        if self.code == self.MISSING_KEY or auth_key is None:
            return (
                "site_key_missing: the SuperLink authenticates sites; make a key with "
                "`python -m client keygen --out DIR`, have the coordinator register DIR/"
                "site_ecdsa.pub, and join with --auth-key DIR/site_ecdsa"
            )
        return (
            f"site_not_registered: the SuperLink refused the key {auth_key}: the coordinator "
            "has not registered its .pub file (`python -m server register-site`), or this "
            "site is still connected from an earlier start (retry after a minute)"
        )
