"""Stage the Flower app into a folder whose name Flower accepts.

``flwr build`` / ``flwr run`` reject an app directory whose name has anything but letters,
digits and hyphens, and a checkout's folder name is not ours to choose (CI clones into any
name). So the CLI copies ``pyproject.toml`` and the files the ``fab-include`` allowlist
selects into ``<parent>/sicfed-app/`` and submits that.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import pathspec

from sic_core.errors import ConfigError

__all__ = ["APP_FOLDER_NAME", "project_root", "stage_app"]

APP_FOLDER_NAME = "sicfed-app"


def project_root() -> Path:
    """The checkout holding ``pyproject.toml`` with the Flower app table."""
    return Path(__file__).resolve().parent.parent


def _include_patterns(pyproject: Path) -> list[str]:
    try:
        config = tomllib.loads(pyproject.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{pyproject}: cannot read the project file ({error})") from None
    app = config.get("tool", {}).get("flwr", {}).get("app", {})
    patterns = app.get("fab-include")
    if not isinstance(patterns, list) or not patterns:
        raise ConfigError(f"{pyproject}: [tool.flwr.app] fab-include must list the app files")
    return [str(pattern) for pattern in patterns]


def stage_app(parent: Path, *, source: Path | None = None) -> Path:
    """Copy the app (pyproject + allowlisted files) to ``parent/sicfed-app`` and return it.

    Parameters
    ----------
    parent
        Folder to stage into (created; a previous staging there is replaced).
    source
        The checkout (default: the one this module lives in).

    Raises
    ------
    ConfigError
        If the allowlist is missing or a pattern matches no file.
    """
    source = (source or project_root()).resolve()
    pyproject = source / "pyproject.toml"
    patterns = _include_patterns(pyproject)
    files = sorted(
        path.relative_to(source).as_posix()
        for path in source.rglob("*.py")
        if "__pycache__" not in path.parts and ".venv" not in path.parts
    )
    for pattern in patterns:
        if not any(pathspec.GitIgnoreSpec.from_lines([pattern]).match_files(files)):
            raise ConfigError(f"{pyproject}: fab-include pattern {pattern!r} matches no file")
    selected = list(pathspec.GitIgnoreSpec.from_lines(patterns).match_files(files))
    target = parent / APP_FOLDER_NAME
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(pyproject, target / "pyproject.toml")
    for relative in selected:
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, destination)
    return target
