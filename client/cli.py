"""The hospital-side command line, ``python -m client``.

Each command lives in its own module under ``client.commands`` and is registered below in
one line; command modules import heavy libraries (torch, MONAI, flwr) inside the command, so
that ``--help`` stays fast. The examples live in the top-level help (:func:`_main`'s
docstring); the option names both CLIs share are listed in :mod:`sic_core.cli_vocabulary`.
"""

from __future__ import annotations

import logging

import typer
from rich.console import Console
from rich.logging import RichHandler

from client.commands import approve, check, join, keygen, pretrain, privacy, sanity, synth

__all__ = ["app"]

app = typer.Typer(
    name="client",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _main(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Log debug detail (may show local file names)."
    ),
) -> None:
    """Hospital-side tools of sicfed: check a site's data, make its key, approve the
    coordinator's app, join a federation, and audit what it trained and spent.

    Every command but synth and keygen takes --site, the site's YAML config.

    [bold]Examples[/bold]

      python -m client check --site site.yaml

      python -m client keygen --out keys --comment site_a

      python -m client approve --site site.yaml --app-hash sha256:3f2a...

      python -m client join --site site.yaml --superlink coordinator.example:8000
      --root-certificates ca.crt --auth-key keys/site_ecdsa

      python -m client privacy --site site.yaml

      python -m client sanity --site site.yaml

      python -m client synth --out synth --size 64   # synthetic sites for a demo

      python -m client pretrain --site public/synth/site_a/site.yaml --out public
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False)],
    )


app.command("synth")(synth.synth)
app.command("check")(check.check)
app.command("join")(join.join)
app.command("keygen")(keygen.keygen)
app.command("approve")(approve.approve)
app.command("privacy")(privacy.privacy)
app.command("pretrain")(pretrain.pretrain)
app.command("sanity")(sanity.sanity)
