"""``python -m server register-site``: admit a site's key through the loopback Control API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.commands.start import DEFAULT_HOME
from server.coordinator import Coordinator
from server.flower_cli import register_node
from server.roster import Roster, key_fingerprint, read_public_key
from sic_core.errors import SicfedError

__all__ = ["register_site"]

console = Console()


def register_site(
    name: Annotated[str, typer.Option(help="The site's pseudonym (as in its site.yaml).")],
    public_key: Annotated[
        Path, typer.Option(help="The site's public key (site_ecdsa.pub from client keygen).")
    ],
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
) -> None:
    """Register a site's public key: only registered sites can join.

    Runs on the coordinator host (the Control API listens on loopback only) while the
    coordinator runs, and records name, key fingerprint and time in HOME/sites.json. Check
    the fingerprint with the site (`ssh-keygen -lf site_ecdsa.pub`) before registering.

    Examples
    --------
    python -m server register-site --home runs/coordinator --name site_a \
        --public-key site_ecdsa.pub
    """
    coordinator = Coordinator(home)
    roster = Roster(coordinator.roster_file)
    try:
        fingerprint = key_fingerprint(read_public_key(public_key))
        roster.check_new(name, fingerprint)
        coordinator.addresses()  # a clear error if the coordinator is not running
        node_id = register_node(public_key, coordinator.flwr_home)
        site = roster.add(name, fingerprint, node_id)
    except SicfedError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    console.print(f"registered site {site.name} ({site.fingerprint}), node id {site.node_id}")
