"""``python -m client approve``: add an app bundle's hash to a site's approved apps."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["approve"]

console = Console()


def approve(
    site: Annotated[
        Path, typer.Option("--site", help="The site's YAML config.", exists=True, dir_okay=False)
    ],
    app_hash: Annotated[
        str, typer.Option(help="The hash `python -m server app-hash` printed (sha256:...).")
    ],
) -> None:
    """Approve one app version: the site then runs bundles with exactly this hash.

    Adds the hash to federation.approved_apps in the site's YAML and changes nothing else:
    every comment, the key order and the quoting are kept; the file is validated before and
    after and replaced atomically. Compare the hash with the one the coordinator announced
    through another channel before approving it.

    Examples
    --------
    python -m client approve --site site.yaml --app-hash sha256:3f2a...
    """
    from client.site_approvals import approve_app
    from sic_core.errors import ConfigError

    try:
        added = approve_app(site, app_hash)
    except ConfigError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    state = "approved" if added else "already approved"
    console.print(f"{app_hash} {state} in {site} (federation.approved_apps)")
