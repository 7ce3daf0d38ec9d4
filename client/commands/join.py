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

__all__ = [
    "FLOWER_POLL_SECONDS",
    "WARM_MODULES",
    "join",
    "shorten_fleet_polling",
    "start_warm_launcher",
    "supernode_argv",
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
import importlib, json, os, signal, socket, sys

address, parent = sys.argv[1], os.getppid()
for name in sys.argv[2:]:
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


def start_warm_launcher(
    folder: Path, site: str, *, modules: tuple[str, ...] = WARM_MODULES
) -> subprocess.Popen:
    """Start a launcher that forks ClientApp processes with heavy libraries already loaded.

    Flower starts a new ``flwr-clientapp`` process for every message; importing torch,
    MONAI and scikit-learn takes most of each one's life (tens of seconds on a busy CPU).
    The launcher imports :data:`WARM_MODULES` once and forks a child per message that runs
    ``flwr-clientapp`` unchanged (the app itself still comes from the bundle the message
    belongs to). ``folder/bin/flwr-clientapp`` is a shim that hands each launch to it; put
    ``folder/bin`` first on ``PATH`` before starting the SuperNode. The launcher exits with
    its parent; its output (and every ClientApp's) goes to this process's stdout.
    """
    address = f"sicfed-{site}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    launcher = folder / "warm_launcher.py"
    launcher.write_text(_LAUNCHER)
    shim = bin_dir / "flwr-clientapp"
    cold = str(Path(sys.executable).parent / "flwr-clientapp")
    # Written beside it and renamed over it, executable: a SuperNode (or a test) that sees
    # the shim never finds it half-written or not yet executable.
    staged = shim.with_name(f".{shim.name}.tmp")
    staged.write_text(_SHIM.format(python=sys.executable, site=site, address=address, cold=cold))
    staged.chmod(0o755)
    os.replace(staged, shim)
    # -I: the launcher must not see the checkout (no project module may be preloaded).
    return subprocess.Popen([sys.executable, "-I", str(launcher), address, *modules])


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


def _data_summary(site_yaml: Path) -> None:
    from client.config import load_site_config
    from client.data import load_site_data

    config = load_site_config(site_yaml)
    data = load_site_data(config, progress=True)
    table = Table(title=f"Site {config.name}: data ready")
    table.add_column("split")
    for name in data.class_names:
        table.add_column(name, justify="right")
    for split, per_class in data.counts().items():
        table.add_row(split, *(str(per_class[name]) for name in data.class_names))
    console.print(table)
    if data.quarantine_counts:
        console.print(f"skipped files by reason: {data.quarantine_counts}")
    for problem in data.problems():
        console.print(f"[yellow]warning:[/] {problem}")


def join(
    site: Annotated[
        Path, typer.Option("--site", help="The site's YAML config.", exists=True, dir_okay=False)
    ],
    superlink: Annotated[
        str, typer.Option(help="SuperLink Fleet API address, HOST:PORT.")
    ] = "127.0.0.1:8000",
    port: Annotated[
        int, typer.Option(help="This SuperNode's local Runtime API port (one per site).")
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
            help="This site's private key, if the SuperLink authenticates sites.", exists=True
        ),
    ] = None,
    flwr_home: Annotated[
        Path | None, typer.Option(help="Private FLWR_HOME (default: <state_dir>/flwr).")
    ] = None,
    poll_interval: Annotated[
        float,
        typer.Option(
            min=0.05,
            help="Seconds between the SuperNode's requests for work (Flower's fixed 3 s "
            "unless shortened; each request is one HTTP call to the SuperLink).",
        ),
    ] = FLOWER_POLL_SECONDS,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="CPU threads of each ClientApp process (OMP_NUM_THREADS)."),
    ] = None,
    prepare: Annotated[
        bool, typer.Option(help="Load (and cache) the site's data before connecting.")
    ] = True,
    warm: Annotated[
        bool,
        typer.Option(
            "--warm/--cold",
            help="Fork each ClientApp from a launcher with torch, MONAI and scikit-learn "
            "already imported (--cold: Flower's fresh process per message).",
        ),
    ] = True,
) -> None:
    """Join a federation: start this site's Flower SuperNode.

    Examples
    --------
    python -m client join --site site_configs/site_a.yaml --root-certificates ca.crt
    python -m client join --site demo/sites/site_a/site.yaml --insecure --port 9095
    """
    from client.config import load_site_config
    from sic_core.errors import SicfedError

    try:
        config = load_site_config(site)
        if not insecure and root_certificates is None:
            raise typer.BadParameter(
                "give --root-certificates (TLS) or --insecure (loopback only)",
                param_hint="--root-certificates",
            )
        if prepare:
            _data_summary(site)
    except SicfedError as error:
        console.print(f"[red]error:[/] {error}")
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
        }
    )
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if warm:
        launcher = start_warm_launcher(home / "warm", config.name)
        atexit.register(launcher.terminate)
        os.environ["PATH"] = f"{home / 'warm' / 'bin'}{os.pathsep}{os.environ['PATH']}"
    if poll_interval < FLOWER_POLL_SECONDS:
        shorten_fleet_polling(poll_interval)
    sys.argv = supernode_argv(
        site_yaml=site,
        superlink=superlink,
        port=port,
        insecure=insecure,
        root_certificates=root_certificates,
        auth_key=auth_key,
    )
    # Flower logs through its own console handler; keep its lines (and every HTTP poll of
    # httpx) out of the CLI's root handler.
    logging.getLogger("flwr").propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)
    console.print(f"Site [bold]{config.name}[/] joining {superlink} (FLWR_HOME={home})")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()
