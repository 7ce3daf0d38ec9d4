"""``python -m server app-hash``: the hash of the app bundle that ``server run`` submits."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console

from server.app_bundle import app_bundle_hash

__all__ = ["app_hash"]

console = Console()


def app_hash() -> None:
    """Print the hash of the app bundle `server run` would submit from this checkout.

    Each site approves it (`python -m client approve --site site.yaml --app-hash HASH`)
    before the run; a bundle with any other hash is refused with app_not_approved. Send it
    to the sites through a channel other than the coordinator's network.

    Examples
    --------
    python -m server app-hash
    """
    with tempfile.TemporaryDirectory() as staging:
        console.print(app_bundle_hash(Path(staging)), highlight=False, soft_wrap=True)
