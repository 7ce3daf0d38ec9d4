"""``python -m server audit verify RUN_DIR``: check a run's hash-chained audit log."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server.audit import verify_audit_log

__all__ = ["audit_app", "verify"]

console = Console()

audit_app = typer.Typer(
    name="audit",
    help="The tamper-evident audit log of a run (runs/<run id>/audit.jsonl).",
    epilog="Example: python -m server audit verify runs/coordinator/runs/4242",
    no_args_is_help=True,
    add_completion=False,
)


@audit_app.command("verify")
def verify(
    run_dir: Annotated[
        Path,
        typer.Argument(help="The run's folder (<run-dir>/runs/<run id>) or its audit.jsonl."),
    ],
) -> None:
    """Check every line's hash chain; name the first line that does not verify (exit 1).

    Prints the number of entries and the hash of the last one (the head): record it
    elsewhere, since dropping lines from the end leaves a shorter chain that still verifies.

    Examples
    --------
    python -m server audit verify runs/coordinator/runs/4242
    python -m server audit verify runs/coordinator/runs/4242/audit.jsonl
    """
    path = run_dir if run_dir.is_file() else run_dir / "audit.jsonl"
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
