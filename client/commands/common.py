"""What several ``python -m client`` commands share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from client.config import SiteConfig

__all__ = ["load_config_or_exit"]


def load_config_or_exit(site: Path, console: Console) -> SiteConfig:
    """The validated site config, or exit code 2 with the config error on ``console``."""
    from client.config import load_site_config
    from sic_core.errors import ConfigError

    try:
        return load_site_config(site)
    except ConfigError as error:
        console.print(f"[red]invalid config:[/red] {error}")
        raise typer.Exit(2) from None
