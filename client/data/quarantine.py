"""The site-local quarantine report: which files were skipped, and why.

The report names files, so it never leaves the site; only :func:`count_reasons` output
(counts by reason code) may be sent anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["QuarantineEntry", "count_reasons", "read_quarantine_report", "write_quarantine_report"]

logger = logging.getLogger(__name__)

REPORT_NAME = "quarantine.json"


@dataclass(frozen=True)
class QuarantineEntry:
    """One skipped file or labels row.

    Attributes
    ----------
    file
        The site-local identifier (path as written in labels.csv, or ``split/index``).
    reason
        Fixed reason code (``Reason`` value).
    message
        Human-readable detail; stays at the site.
    """

    file: str
    reason: str
    message: str


def count_reasons(entries: Iterable[QuarantineEntry]) -> dict[str, int]:
    """Counts by reason code, sorted by code: the only part that may leave the site."""
    counts = Counter(str(entry.reason) for entry in entries)
    return dict(sorted(counts.items()))


def write_quarantine_report(state_dir: Path, site: str, entries: Iterable[QuarantineEntry]) -> Path:
    """Write ``state_dir/quarantine.json`` atomically and return its path.

    Parameters
    ----------
    state_dir
        The site's state directory (created when missing).
    site
        The site pseudonym.
    entries
        Every skipped file of the last pipeline run.
    """
    ordered = sorted(entries, key=lambda entry: (entry.reason, entry.file))
    payload = {
        "site": site,
        "total": len(ordered),
        "counts": count_reasons(ordered),
        "files": [
            {"file": entry.file, "reason": str(entry.reason), "message": entry.message}
            for entry in ordered
        ],
    }
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / REPORT_NAME
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    os.replace(temporary, path)
    for entry in ordered:
        logger.debug("Quarantined %s: %s (%s)", entry.file, entry.reason, entry.message)
    return path


def read_quarantine_report(state_dir: Path) -> list[QuarantineEntry]:
    """The entries of the last report in ``state_dir`` (empty when there is none)."""
    try:
        payload = json.loads((state_dir / REPORT_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return [
        QuarantineEntry(item["file"], item["reason"], item["message"]) for item in payload["files"]
    ]
