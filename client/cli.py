"""The hospital-side command line, ``python -m client``.

Each command lives in its own module under ``client.commands`` and is registered below in
one line; command modules import heavy libraries (torch, MONAI) inside the command, so that
``--help`` stays fast.
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
    help="Hospital-side tools of sicfed: check a site's data, generate synthetic sites.",
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
    """Hospital-side tools of sicfed: check a site's data, generate synthetic sites."""
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
