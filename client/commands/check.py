"""``python -m client check``: validate a site's config and run its whole data pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["check"]

_SHOWN_FILES = 20


def check(
    site: Annotated[Path, typer.Option("--site", help="The site's YAML config.")],
    list_files: Annotated[
        bool, typer.Option(help=f"Also list up to {_SHOWN_FILES} skipped files (local only).")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Decoding processes (default: CPU cores, at most 4).")
    ] = None,
) -> None:
    """Validate a site config, decode and cache all its images, report what can train.

    Prints the compute device the site will use (compute.device: a GPU's name and memory),
    images per split and class, and skipped files counted by reason. A GPU that
    compute.device asks for but this machine lacks is an invalid config (exit code 2).

    The list of skipped files stays in the site's state_dir/quarantine.json.

    Exit code: 0 the site can train, 1 its data cannot be used, 2 invalid config.

    [bold]Examples[/bold]

      python -m client check --site site_configs/synthcxr_site_a.yaml

      python -m client check --site /data/site.yaml --list-files
    """
    from client.commands.common import load_config_or_exit
    from client.data import load_site_data, read_quarantine_report
    from client.data.readiness import missing_data_sources
    from client.device import describe_device, site_device
    from sic_core.errors import ConfigError, DataError

    console = Console()
    config = load_config_or_exit(site, console)
    try:
        device = site_device(config)
    except ConfigError as error:
        console.print(f"[red]invalid config:[/red] {site}: {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"Site [bold]{config.name}[/bold]: {config.data.format} data, config valid")
    console.print(f"Compute device: {describe_device(device)}")
    # As `join` does: a wrong path is named as such, not as files that could not be read.
    missing = missing_data_sources(config)
    for problem in missing:
        console.print(f"[red]cannot train:[/red] {site}: {problem}", soft_wrap=True)
    if missing:
        raise typer.Exit(1)
    try:
        data = load_site_data(config, progress=True, workers=workers)
    except DataError as error:
        console.print(f"[red]cannot read the site's data ({error.reason}):[/red] {error}")
        raise typer.Exit(1) from None

    counts = data.counts()
    table = Table(title="Images per split and class")
    table.add_column("split")
    for name in data.class_names:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    for split, per_class in counts.items():
        table.add_row(split, *(str(n) for n in per_class.values()), str(sum(per_class.values())))
    console.print(table)
    console.print(f"{data.cached} images from the cache, {data.decoded} decoded")

    if data.quarantine_counts:
        skipped = Table(title="Skipped files by reason")
        skipped.add_column("reason")
        skipped.add_column("files", justify="right")
        for reason, number in data.quarantine_counts.items():
            skipped.add_row(reason, str(number))
        console.print(skipped)
        console.print(f"Full list (stays at the site): {data.quarantine_report}")
        if list_files:
            for entry in read_quarantine_report(config.state_dir)[:_SHOWN_FILES]:
                console.print(f"  {entry.reason:<24} {entry.file}: {entry.message}")
    else:
        console.print("No file was skipped.")
    for warning in data.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    problems = data.problems()
    if problems:
        for problem in problems:
            console.print(f"[red]cannot train:[/red] {problem}")
        raise typer.Exit(1)
    console.print(f"[green]Site {config.name} can train.[/green]")
