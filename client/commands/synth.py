"""``python -m client synth``: write the SynthCXR synthetic federation."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from sic_core.cli_vocabulary import deprecated_option

__all__ = ["synth"]


class PresetName(StrEnum):
    """Presets of DATA.md."""

    EASY = "easy"
    DEFAULT = "default"
    HARD = "hard"


def synth(
    out: Annotated[
        Path,
        typer.Option("--out", help="Output folder: new, empty, or a previous SynthCXR output."),
    ],
    preset: Annotated[
        PresetName, typer.Option(help="Lesion size and contrast (easy: CI and CPU demo).")
    ] = PresetName.EASY,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Image side in pixels.")] = 128,
    scale: Annotated[
        float,
        typer.Option(min=0.001, help="Multiplies every site's image count (A 800, B 400...)."),
    ] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed; the same seed gives the same bytes.")] = 0,
    classes: Annotated[
        int, typer.Option(min=2, max=3, help="2: normal/nodule; 3: normal/solid/cavitary.")
    ] = 2,
    sites_config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with a `sites:` list (fields as in manifest.json) replacing A-D."
        ),
    ] = None,
    sites: Annotated[
        Path | None,
        typer.Option(hidden=True, callback=deprecated_option("--sites", "--sites-config")),
    ] = None,
) -> None:
    """Generate SynthCXR: three training sites (B has a shortcut marker) and a held-out site.

    Each site folder gets DICOM files, masks, labels.csv and a ready site.yaml.

    OUT also gets manifest.json (every parameter) and a MedMNIST-layout .npz.

    [bold]Examples[/bold]

      python -m client synth --out synth

      python -m client synth --out demo --preset easy --size 64 --scale 0.25

      python -m client synth --out hard3 --preset hard --classes 3 --seed 7
    """
    from client.synth import generate_synthcxr, load_site_specs
    from sic_core.errors import ConfigError

    sites_config = sites_config if sites is None else sites
    console = Console()
    started = time.perf_counter()
    try:
        specs = load_site_specs(sites_config) if sites_config is not None else None
        generate_synthcxr(
            out,
            preset=str(preset),
            size=size,
            scale=scale,
            seed=seed,
            classes=classes,
            sites=specs,
        )
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    elapsed = time.perf_counter() - started
    _print_summary(console, out, elapsed)


def _print_summary(console: Console, out: Path, elapsed: float) -> None:
    import json

    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    table = Table(title=f"SynthCXR ({manifest['preset']['name']}, {manifest['size']} px)")
    for column in ("site", "images", "train", "val", "test", "markers", "role"):
        table.add_column(column, justify="left" if column in ("site", "role") else "right")
    for site in manifest["sites"]:
        per_split = {split: sum(counts.values()) for split, counts in site["counts"].items()}
        table.add_row(
            site["name"],
            str(site["images"]),
            str(per_split["train"]),
            str(per_split["val"]),
            str(per_split["test"]),
            str(site["markers"]),
            "held out" if site["held_out"] else "train",
        )
    console.print(table)
    console.print(f"Wrote {out} in {elapsed:.1f} s; site configs: {out}/<site>/site.yaml")
