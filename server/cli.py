"""The coordinator CLI: ``python -m server start | run | resume | status | stop | ...``.

Examples
--------
Run the whole synthetic federation on this machine::

    python -m server demo --sites 3 --rounds 3

Operate a deployment::

    python -m server certs --home /srv/sicfed --san coordinator.example
    python -m server start --home /srv/sicfed --host 0.0.0.0
    python -m server register-site --home /srv/sicfed --name site_a --public-key a.pub
    python -m server app-hash
    python -m server run --home /srv/sicfed --set rounds=10 --set strategy=fedprox
    python -m server status --home /srv/sicfed
    python -m server stop --home /srv/sicfed

After a crash: restart the SuperLink (MLflow is reused) and continue the run::

    python -m server start --home /srv/sicfed --host 0.0.0.0
    python -m server resume --home /srv/sicfed

Rebuild a run's per-site reports and federation summary from MLflow::

    python -m server report /srv/sicfed/runs/4242

Check a run's hash-chained audit log::

    python -m server audit verify /srv/sicfed/runs/4242
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

app = typer.Typer(
    name="server",
    help="sicfed coordinator: SuperLink, MLflow tracking and federation runs.",
    no_args_is_help=True,
    add_completion=False,
)
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
