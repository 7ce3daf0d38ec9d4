"""The hash of the app bundle (FAB) that ``server run`` submits: what sites approve.

Flower builds the bundle from the staged app with fixed zip timestamps, so the same files
always give the same bytes and the same hash. Sites compare it with the hash of the bundle
they receive (``client.app_approval``, the same ``sha256:<hex>`` format).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from server.staging import stage_app

__all__ = ["app_bundle_hash", "bundle_hash"]


def bundle_hash(app_dir: Path) -> str:
    """``sha256:<hex>`` of the bundle ``flwr run`` builds from ``app_dir``."""
    from flwr.cli.build import build_fab_from_disk  # flwr: only when a bundle is hashed

    return f"sha256:{hashlib.sha256(build_fab_from_disk(app_dir)).hexdigest()}"


def app_bundle_hash(staging_parent: Path, *, source: Path | None = None) -> str:
    """Stage the app (as ``server run`` does) under ``staging_parent`` and hash its bundle."""
    return bundle_hash(stage_app(staging_parent, source=source))
