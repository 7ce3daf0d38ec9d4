"""``python -m server certs``: the coordinator's CA and the SuperLink's TLS certificate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator
from server.tls import LOOPBACK_NAMES, create_certificates
from sic_core.errors import ConfigError

__all__ = ["certs"]

console = Console()


def certs(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    san: Annotated[
        list[str] | None,
        typer.Option(
            help="A host name or IP address sites use to reach the SuperLink (repeatable)."
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing TLS files.")] = False,
) -> None:
    """Create a private CA and the SuperLink's certificate in HOME/tls/.

    The certificate is valid for every --san and for 127.0.0.1 and localhost (the
    coordinator's own loopback Control API). Give HOME/tls/ca.crt to every site; ca.key and
    server.key never leave the coordinator.

    Examples
    --------
    python -m server certs --home runs/coordinator --san 127.0.0.1 --san coordinator.example
    """
    coordinator = Coordinator(home)
    try:
        files = create_certificates(coordinator.tls.folder, list(san or []), overwrite=overwrite)
    except ConfigError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    names = list(dict.fromkeys([*(san or []), *LOOPBACK_NAMES]))
    console.print(f"CA certificate (give to every site): {files.ca_cert}")
    console.print(f"server certificate for {', '.join(names)}: {files.server_cert}")
