"""``python -m server report RUN_DIR``: rebuild a federation's reports from MLflow alone."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["report"]

console = Console()


def _log_dir(run_dir: Path, run_id: str | None) -> Path:
    """The run's log folder (``<run-dir>/runs/<run id>``) from either of the two layouts."""
    if (run_dir / "status.json").exists():
        return run_dir
    runs = run_dir / "runs"
    candidates = sorted(
        (p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else [],
        key=lambda p: p.stat().st_mtime,
    )
    if run_id is not None:
        candidates = [p for p in candidates if p.name == run_id]
    if not candidates:
        wanted = f"run {run_id}" if run_id else "any run"
        raise typer.BadParameter(
            f"{run_dir} holds no log folder of {wanted}: expected {run_dir}/status.json or "
            f"{run_dir}/runs/<run id>/status.json",
            param_hint="RUN_DIR",
        )
    return candidates[-1]


def _mlflow_of(log_dir: Path) -> tuple[str, str]:
    """(tracking URI, parent run id) recorded in the run's latest checkpoint."""
    from server.checkpoint import load_checkpoint

    checkpoints = sorted((log_dir.parent.parent / "checkpoints" / log_dir.name).glob("round_*.pt"))
    if not checkpoints:
        raise typer.BadParameter(
            f"no checkpoint of run {log_dir.name} under "
            f"{log_dir.parent.parent / 'checkpoints' / log_dir.name}: it records the MLflow run",
            param_hint="RUN_DIR",
        )
    state = load_checkpoint(checkpoints[-1])
    tracking_uri = str(state.get("run_config", {}).get("tracking-uri", ""))
    parent_run_id = str(state.get("mlflow", {}).get("parent_run_id", ""))
    return tracking_uri, parent_run_id


def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="The run's folder (<run-dir>/runs/<run id>) or the run-dir that holds it.",
            exists=True,
            file_okay=False,
        ),
    ],
    run_id: Annotated[
        str | None, typer.Option(help="Run id, when RUN_DIR holds several (default: newest).")
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow tracking server (default: the one the run logged to)."),
    ] = None,
) -> None:
    """Rebuild every site's round reports and the federation summary from MLflow.

    Reads the run's metric histories and the reports stored in each site's child run, and
    writes ``report.{json,html}`` per round and site plus ``federation_summary.{json,html}``
    under ``<run-dir>/runs/<run id>/reports/`` (replacing what is there).

    Examples
    --------
    python -m server report demo-out

    python -m server report demo-out/runs/4242 --tracking-uri http://127.0.0.1:5000
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

    log_dir = _log_dir(run_dir.resolve(), run_id)
    recorded_uri, parent_run_id = _mlflow_of(log_dir)
    uri = tracking_uri or recorded_uri
    if not uri or not parent_run_id:
        raise typer.BadParameter(
            f"run {log_dir.name} was not tracked in MLflow (no tracking-uri in its run config)",
            param_hint="RUN_DIR",
        )
    try:
        with tempfile.TemporaryDirectory() as scratch:
            stored = read_federation(MlflowClient(uri), parent_run_id, Path(scratch))
    except MlflowException as error:
        console.print(f"[red]cannot read run {parent_run_id} from {uri}:[/] {error.message}")
        console.print("Start the tracking server the run used, or pass --tracking-uri.")
        raise typer.Exit(1) from None
    out = log_dir / "reports"
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
