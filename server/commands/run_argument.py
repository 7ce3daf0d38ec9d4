"""The ``RUN_ID`` argument of the commands that read one run of ``--home`` (report, audit).

A run's files are ``HOME/runs/<run id>/`` and ``HOME/checkpoints/<run id>/``
(:class:`server.checkpoint.RunFiles`). Until the next release the argument may still be a
folder, as it was before ``--home``: a run's folder, or a folder holding ``runs/``.
"""

from __future__ import annotations

from pathlib import Path

from server.checkpoint import RunFiles
from sic_core.cli_vocabulary import warn_deprecated
from sic_core.errors import ConfigError

__all__ = ["chosen_run", "newest_run_id"]


def newest_run_id(home: Path) -> str:
    """The id of the run of ``home`` whose folder changed last.

    Raises
    ------
    ConfigError
        If ``home/runs`` holds no run folder.
    """
    runs = Path(home) / "runs"
    folders = [path for path in runs.iterdir() if path.is_dir()] if runs.is_dir() else []
    if not folders:
        raise ConfigError(f"{home} holds no run: expected {runs}/<run id>/")
    return max(folders, key=lambda path: path.stat().st_mtime).name


def chosen_run(home: Path, run: str | None, *, command: str) -> RunFiles:
    """The files of run ``run`` of ``home`` (``None``: the newest).

    ``run`` may still be a folder (with a deprecation warning naming ``command``): a run's
    folder ``HOME/runs/<run id>``, or a folder holding ``runs/`` (its newest run).

    Raises
    ------
    ConfigError
        If there is no such run.
    """
    if run is not None and not run.isdigit():
        folder = Path(run)
        if not folder.is_dir():
            raise ConfigError(f"{run!r} is not a run id (a number from {Path(home) / 'runs'})")
        warn_deprecated(f"{command} RUN_DIR", f"{command} --home HOME RUN_ID")
        if folder.parent.name == "runs" or (folder / "status.json").exists():
            return RunFiles(folder.parent.parent, folder.name)
        home, run = folder, None
    files = RunFiles(home, run if run is not None else newest_run_id(home))
    if not files.log_dir.is_dir():
        raise ConfigError(f"{home} has no run {files.run_id}: no folder {files.log_dir}")
    return files
