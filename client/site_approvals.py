"""Editing a site's ``federation.approved_apps`` (what ``python -m client approve`` does)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from client.app_approval import APP_HASH_PATTERN
from client.config import load_site_config
from sic_core.errors import ConfigError

__all__ = ["approve_app"]


def approve_app(site_yaml: Path, app_hash: str) -> bool:
    """Add ``app_hash`` to the site's approved apps; return False if it was there already.

    The file is rewritten atomically; the comment lines above its first setting are kept.

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
    raw = yaml.safe_load(text)
    federation = raw.get("federation") or {}
    raw["federation"] = federation
    federation["approved_apps"] = [*federation.get("approved_apps", []), app_hash]
    header = []
    for line in text.splitlines(keepends=True):
        if line.strip() and not line.startswith("#"):
            break
        header.append(line)
    staged = site_yaml.with_name(f".{site_yaml.name}.tmp")
    staged.write_text("".join(header) + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    try:
        load_site_config(staged)
    except ConfigError:
        staged.unlink()
        raise
    os.replace(staged, site_yaml)
    return True
