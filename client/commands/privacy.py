"""``python -m client privacy``: the site's privacy ledger and the budget left."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["privacy"]


def privacy(
    site: Annotated[Path, typer.Option("--site", help="The site's YAML config.")],
) -> None:
    """Print every privacy mechanism this site has applied, ε spent and the budget left.

    ε is composed over the whole ledger (state_dir/privacy_ledger.json) with Opacus' RDP
    accountant at the site's target δ; restarting a site never resets it.

    Exit code: 0 budget left, 1 budget exhausted, 2 invalid config or unreadable ledger.

    [bold]Examples[/bold]

      python -m client privacy --site site_configs/synthcxr_site_a.yaml
    """
    from client.config import load_site_config
    from client.privacy.ledger import PrivacyLedger
    from sic_core.errors import ConfigError

    console = Console()
    try:
        config = load_site_config(site)
        ledger = PrivacyLedger.in_state_dir(
            config.state_dir,
            delta=config.privacy.target_delta,
            max_epsilon=config.privacy.max_epsilon,
        )
    except ConfigError as error:
        console.print(f"[red]cannot read the privacy ledger:[/red] {error}")
        raise typer.Exit(2) from None
    table = Table(title=f"Privacy ledger of {config.name}")
    for column in ("round", "mechanism", "noise multiplier", "sample rate", "steps", "recorded"):
        table.add_column(column)
    for m in ledger.mechanisms:
        table.add_row(
            str(m.round),
            m.kind,
            f"{m.noise_multiplier:.3f}",
            f"{m.sample_rate:.4f}",
            str(m.steps),
            m.recorded_at,
        )
    console.print(table)
    spent = ledger.epsilon
    left = config.privacy.max_epsilon - spent
    state = (
        "privacy.enabled: true (DP-SGD in every run)"
        if config.privacy.enabled
        else "privacy.enabled: false (DP-SGD only in runs whose run config sets dp = true)"
    )
    console.print(
        f"{state}; epsilon spent {spent:.3f} of {config.privacy.max_epsilon} at delta "
        f"{config.privacy.target_delta:g}; left {max(left, 0):.3f}"
    )
    if left <= 0:
        console.print("[red]budget exhausted: this site refuses further DP training[/red]")
        raise typer.Exit(1)
