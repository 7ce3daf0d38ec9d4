"""``python -m client keygen``: make this site's authentication key pair."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["keygen"]

console = Console()


def keygen(
    out: Annotated[Path, typer.Option(help="Folder for the key pair (created).")],
    comment: Annotated[
        str, typer.Option(help="Label appended to the public key (e.g. the site name).")
    ] = "sicfed-site",
) -> None:
    """Make the site's key pair (OpenSSH ECDSA P-384, the format Flower's SuperNode needs).

    Keep OUT/site_ecdsa at the site (join --auth-key); send OUT/site_ecdsa.pub to the
    coordinator, who registers it with `python -m server register-site`.

    Examples
    --------
    python -m client keygen --out keys --comment site_a
    """
    from client.site_keys import generate_site_keys
    from sic_core.errors import ConfigError

    try:
        private, public = generate_site_keys(out, comment=comment)
    except ConfigError as error:
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(2) from None
    console.print(f"private key (stays here, join --auth-key): {private}")
    console.print(f"public key (send to the coordinator):      {public}")
