"""``python -m server audit verify --home HOME [RUN_ID]``: check a run's hash-chained audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.audit import verify_audit_log
from server.commands.run_argument import chosen_run
from server.commands.start import DEFAULT_HOME
from sic_core.cli_vocabulary import warn_deprecated
from sic_core.errors import ConfigError

__all__ = ["audit_app", "verify"]

console = Console()

audit_app = typer.Typer(
    name="audit",
    help="The tamper-evident audit log of a run (HOME/runs/<run id>/audit.jsonl).",
    epilog="Example: python -m server audit verify --home runs/coordinator 4242",
    no_args_is_help=True,
    add_completion=False,
)


@audit_app.command("verify")
def verify(
    run: Annotated[
        str | None,
        typer.Argument(metavar="RUN_ID", help="The run of HOME (default: the newest)."),
    ] = None,
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
) -> None:
    """Check every line's hash chain; name the first line that does not verify (exit 1).

    Reads HOME/runs/<run id>/audit.jsonl. Prints the number of entries and the hash of the
    last one (the head): record it elsewhere, since dropping lines from the end leaves a
    shorter chain that still verifies.

    Examples
    --------
    python -m server audit verify --home runs/coordinator 4242
    python -m server audit verify --home runs/coordinator   # the newest run
    """
    try:
        if run is not None and Path(run).is_file():  # the old `audit verify FILE`
            warn_deprecated("audit verify FILE", "audit verify --home HOME RUN_ID")
            path = Path(run)
        else:
            path = chosen_run(home, run, command="audit verify").audit_path
    except ConfigError as error:
        console.print(f"[red]error:[/] {error}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    if not path.is_file():
        console.print(f"[red]error:[/] no audit log at {path}", markup=True)
        raise typer.Exit(2)
    verdict = verify_audit_log(path)
    if not verdict.ok:
        console.print(
            f"{path}: line {verdict.bad_line} does not verify ({verdict.problem}); "
            f"{verdict.entries} lines before it do",
            markup=False,
        )
        raise typer.Exit(1)
    console.print(f"{path}: {verdict.entries} entries verify; head {verdict.head}", markup=False)
