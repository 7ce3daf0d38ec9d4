"""The coordinator CLI, ``python -m server``: one module per command under ``server.commands``.

The examples live in the top-level help (:func:`_main`'s docstring); the option names both
CLIs share are listed in :mod:`sic_core.cli_vocabulary`. Command modules import torch, flwr
and MLflow inside the commands that need them, so that ``--help`` answers without them.
"""

from __future__ import annotations

import typer

from server.commands.app_hash import app_hash
from server.commands.audit import audit_app
from server.commands.certs import certs
from server.commands.demo import demo
from server.commands.register_site import register_site
from server.commands.report import report
from server.commands.resume import resume
from server.commands.run import run
from server.commands.start import start
from server.commands.status import status
from server.commands.stop import stop

__all__ = ["app"]

app = typer.Typer(name="server", no_args_is_help=True, add_completion=False)


@app.callback()
def _main() -> None:
    """sicfed coordinator: the SuperLink, MLflow tracking and federation runs.

    Every command works in one coordinator folder, --home (default runs/coordinator): a
    run writes HOME/runs/<run id>/ (rounds, status, audit log, reports) and
    HOME/checkpoints/<run id>/.

    Examples
    --------
    python -m server demo --num-sites 3 --rounds 3 --home demo-out   # all on this machine

    python -m server certs --home /srv/sicfed --san coordinator.example
    python -m server start --home /srv/sicfed --host 0.0.0.0
    python -m server register-site --home /srv/sicfed --name site_a --public-key site_ecdsa.pub
    python -m server app-hash
    python -m server run --home /srv/sicfed --set rounds=10 --set strategy=fedprox
    python -m server status --home /srv/sicfed
    python -m server resume --home /srv/sicfed   # after a crash and a new start
    python -m server report --home /srv/sicfed 4242
    python -m server audit verify --home /srv/sicfed 4242
    python -m server stop --home /srv/sicfed
    """


app.command("certs")(certs)
app.command("start")(start)
app.command("register-site")(register_site)
app.command("app-hash")(app_hash)
app.command("run")(run)
app.command("resume")(resume)
app.command("status")(status)
app.command("stop")(stop)
app.command("demo")(demo)
app.command("report")(report)
app.add_typer(audit_app)
