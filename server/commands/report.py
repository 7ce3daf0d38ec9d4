"""``python -m server report --home HOME [RUN_ID]``: rebuild a run's reports from MLflow alone."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.checkpoint import RunFiles
from server.commands.run_argument import chosen_run
from server.commands.start import DEFAULT_HOME
from sic_core.cli_vocabulary import deprecated_option, warn_deprecated
from sic_core.errors import ConfigError

__all__ = ["report"]

console = Console()


def _mlflow_of(files: RunFiles) -> tuple[str, str]:
    """(tracking URI, parent run id) recorded in the run's latest checkpoint."""
    from server.checkpoint import load_checkpoint

    checkpoints = sorted(files.checkpoint_dir.glob("round_*.pt"))
    if not checkpoints:
        raise typer.BadParameter(
            f"no checkpoint of run {files.run_id} under {files.checkpoint_dir}: it records "
            "the MLflow run",
            param_hint="RUN_ID",
        )
    state = load_checkpoint(checkpoints[-1])
    tracking_uri = str(state.get("run_config", {}).get("tracking-uri", ""))
    parent_run_id = str(state.get("mlflow", {}).get("parent_run_id", ""))
    return tracking_uri, parent_run_id


def report(
    run: Annotated[
        str | None,
        typer.Argument(metavar="RUN_ID", help="The run of HOME (default: the newest)."),
    ] = None,
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking server (default: the one the run logged to)."),
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option(hidden=True, callback=deprecated_option("--run-id", "RUN_ID")),
    ] = None,
) -> None:
    """Rebuild every site's round reports and the federation summary from MLflow.

    Reads the run's metric histories and the reports stored in each site's child run, and
    writes ``report.{json,html}`` per round and site plus ``federation_summary.{json,html}``
    under ``HOME/runs/<run id>/reports/`` (replacing what is there).

    Examples
    --------
    python -m server report --home demo-out

    python -m server report --home demo-out 4242 --tracking-uri http://127.0.0.1:5000
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from server.reports import (
        federation_summary,
        with_site_context,
        write_federation_summary,
        write_site_reports,
    )
    from server.tracking import read_federation

    if run_id is not None:
        if run is not None and not run.isdigit():  # the old `report RUN_DIR --run-id ID`
            warn_deprecated("report RUN_DIR", "report --home HOME RUN_ID")
            home = Path(run)
        run = run_id
    try:
        files = chosen_run(home.resolve(), run, command="report")
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="RUN_ID") from None
    recorded_uri, parent_run_id = _mlflow_of(files)
    uri = tracking_uri or recorded_uri
    if not uri or not parent_run_id:
        raise typer.BadParameter(
            f"run {files.run_id} was not tracked in MLflow (no tracking-uri in its run config)",
            param_hint="RUN_ID",
        )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            stored = read_federation(MlflowClient(uri), parent_run_id, Path(scratch))
    except MlflowException as error:
        console.print(f"[red]cannot read run {parent_run_id} from {uri}:[/] {error.message}")
        console.print("Start the tracking server the run used, or pass --tracking-uri.")
        raise typer.Exit(1) from None
    out = files.reports_dir
    table = Table(title=f"Reports of {stored.run} rebuilt from {uri}")
    for column in ("round", "site", "flags", "report"):
        table.add_column(column)
    for server_round in sorted(stored.reports):
        history = {r: v for r, v in stored.values.items() if r <= server_round}
        flags = stored.flags.get(server_round, {})
        rebuilt = {
            site: with_site_context(site_report, site, history, flags.get(site, {}))
            for site, site_report in stored.reports[server_round].items()
        }
        for site, folder in write_site_reports(out, server_round, rebuilt).items():
            raised = [k.removeprefix("flag/") for k, v in flags.get(site, {}).items() if v]
            table.add_row(
                str(server_round), site, ", ".join(raised) or "-", str(folder / "report.html")
            )
    paths = write_federation_summary(
        out, federation_summary(stored.run, stored.values, stored.flags)
    )
    console.print(table)
    console.print(f"federation summary: {paths[1]}")
