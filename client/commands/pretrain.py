"""``python -m client pretrain``: a public warm start for the federation's initial model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sic_core.cli_vocabulary import WARM_START_FILE, warn_deprecated

__all__ = ["pretrain"]


def pretrain(
    site: Annotated[
        list[Path],
        typer.Option("--site", help="YAML config of a PUBLIC data set (repeat for several)."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help=f"Folder for the checkpoint (created; the file is {WARM_START_FILE})."
        ),
    ],
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Central training epochs (default: 30).")
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 32,
    encoder: Annotated[str, typer.Option(help="Encoder (as the run config's `encoder`).")] = (
        "bcos_cnn_small"
    ),
    num_classes: Annotated[int, typer.Option(min=2, help="As the run config.")] = 2,
    n_shot: Annotated[int, typer.Option(min=1, help="As the run config.")] = 3,
    proj_dim: Annotated[int, typer.Option(min=1, help="As the run config.")] = 128,
    seed: Annotated[int, typer.Option(min=0, help="Initialisation and training seed.")] = 0,
) -> None:
    """Train the initial global model on public images, into OUT/init.pt.

    The run config's `initial-weights` then names that file.

    Trains on the first --site's compute.device (a GPU asked for but missing stops with
    exit code 2). Only public data may go in: nothing here is differentially private, and
    nothing is recorded in a privacy ledger. SynthCXR generated with another seed than the
    federation's is public (the generator is).

    [bold]Examples[/bold]

      python -m client synth --out public/synth --size 64 --seed 1000

      python -m client pretrain --site public/synth/site_a/site.yaml
      --site public/synth/site_c/site.yaml --out public
    """
    from client.config import load_site_config
    from client.device import describe_device, site_device
    from client.warm_start import PUBLIC_WARM_START_EPOCHS, public_warm_start
    from sic_core.checkpoint import save_checkpoint
    from sic_core.errors import ConfigError

    console = Console()
    checkpoint = out / WARM_START_FILE
    if out.suffix == ".pt":  # the old spelling named the file itself
        warn_deprecated("--out FILE.pt", f"--out FOLDER (the file is FOLDER/{WARM_START_FILE})")
        checkpoint = out
    try:
        configs = [load_site_config(path) for path in site]
        device = site_device(configs[0])
        console.print(f"Compute device: {describe_device(device)}")
        with console.status(f"Pretraining on {len(configs)} public site(s) ..."):
            result = public_warm_start(
                configs,
                encoder=encoder,
                num_classes=num_classes,
                n_shot=n_shot,
                proj_dim=proj_dim,
                epochs=PUBLIC_WARM_START_EPOCHS if epochs is None else epochs,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                device=device,
            )
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    save_checkpoint(checkpoint, result.model, metadata=result.metadata())
    console.print(
        f"Pretrained on {result.images} public images ({', '.join(result.sites)}), "
        f"{len(result.history.epochs)} epochs, final loss {result.history.final_loss:.4f}, "
        f"{result.seconds:.0f} s: {checkpoint}"
    )
    if result.stalled:
        console.print(
            "[yellow]warning:[/yellow] the loss never left its initial plateau: the model "
            "separates nothing yet; train more --epochs"
        )
