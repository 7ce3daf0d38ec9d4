"""Editing a site's ``federation.approved_apps`` (what ``python -m client approve`` does).

The site YAML belongs to the hospital: it is edited in place through a round-trip YAML
library, so every comment, the key order, the quoting and the indentation survive, and
only the approved list changes.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

from client.app_approval import APP_HASH_PATTERN
from client.config import load_site_config
from sic_core.errors import ConfigError

__all__ = ["approve_app"]


def _round_trip(text: str) -> YAML:
    """A round-trip YAML that writes ``text`` back as it was written (indentation, quotes)."""
    _, indent, sequence_offset = load_yaml_guess_indent(text)
    editor = YAML()  # round-trip: keeps comments and key order
    editor.preserve_quotes = True
    editor.width = 4096  # never re-wrap a long value
    editor.indent(mapping=indent, sequence=indent, offset=sequence_offset or 0)
    editor.explicit_start = text.lstrip().startswith("---")
    # The round-trip dumper writes null as nothing (`frame:`); the project's files spell it.
    editor.representer.add_representer(
        type(None),
        lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"),
    )
    return editor


def _with_hash(document: CommentedMap, app_hash: str) -> None:
    """Append ``app_hash`` to ``federation.approved_apps``, making either where missing."""
    federation = document.get("federation")
    if not isinstance(federation, CommentedMap):
        federation = CommentedMap()
        document["federation"] = federation
    approved = federation.get("approved_apps")
    if not isinstance(approved, CommentedSeq):
        approved = CommentedSeq()
        federation["approved_apps"] = approved
    approved.append(app_hash)


def approve_app(site_yaml: Path, app_hash: str) -> bool:
    """Add ``app_hash`` to the site's approved apps; return False if it was there already.

    Everything else in the file stays as it was: comments (above the settings and inline),
    key order, quoting and indentation. The edited file is validated before it atomically
    replaces the original, with the original's permissions.

    Raises
    ------
    ConfigError
        If the hash is malformed or the site config is invalid (before or after).
    """
    if APP_HASH_PATTERN.fullmatch(app_hash) is None:
        raise ConfigError(
            f"--app-hash {app_hash!r}: expected sha256: and 64 lowercase hex digits "
            "(as `python -m server app-hash` prints it)"
        )
    config = load_site_config(site_yaml)
    if app_hash in config.federation.approved_apps:
        return False
    text = site_yaml.read_text(encoding="utf-8")
    try:
        editor = _round_trip(text)
        document = editor.load(text)
        _with_hash(document, app_hash)
        edited = io.StringIO()
        editor.dump(document, edited)
    except YAMLError as error:  # valid for PyYAML, yet not round-trippable
        raise ConfigError(f"{site_yaml}: cannot edit the site config: {error}") from None
    staged = site_yaml.with_name(f".{site_yaml.name}.tmp")
    try:
        staged.write_text(edited.getvalue(), encoding="utf-8")
        os.chmod(staged, stat.S_IMODE(site_yaml.stat().st_mode))
        load_site_config(staged)
        os.replace(staged, site_yaml)
    finally:
        staged.unlink(missing_ok=True)
    return True
