"""``python -m client join``: connect this site to a federation as a Flower SuperNode.

Validates the site config, prepares the site's data cache (so the first round does not
decode DICOM under a deadline), then runs ``flower-supernode`` in this process with the site
config as its node config and a private ``FLWR_HOME`` in the site's state folder. Heavy
imports happen inside the command so that ``--help`` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["FLOWER_POLL_SECONDS", "join", "shorten_fleet_polling", "supernode_argv"]

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

    loop.time = types.SimpleNamespace(  # type: ignore[assignment]
        **{name: getattr(time, name) for name in dir(time) if not name.startswith("_")},
        sleep=capped_sleep,
    )


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
    console.print(f"Site [bold]{config.name}[/] joining {superlink} (FLWR_HOME={home})")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()
