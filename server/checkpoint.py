"""Atomic round checkpoints and the round log of a federation run.

Layout under the run directory (``run-dir`` in the run config)::

    checkpoints/<run-id>/round_001.pt   weights, support set, strategy state, RNG, MLflow ids
    runs/<run-id>/rounds.jsonl          one JSON line per finished round (what the CLI shows)
    runs/<run-id>/status.json           running | completed | failed, with a reason code

Every file is written to a temporary file in the same folder, flushed, fsynced and renamed
over the target, so a crash leaves either the old or the new version, never half a file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from sic_core.atomic import atomic_write

__all__ = [
    "CHECKPOINT_PATTERN",
    "RunFiles",
    "atomic_write_bytes",
    "load_checkpoint",
    "read_rounds",
    "read_status",
]

CHECKPOINT_PATTERN = "round_{:03d}.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename)."""
    atomic_write(path, lambda stream: stream.write(data))


class RunFiles:
    """Paths and writers for one federation run.

    Parameters
    ----------
    run_dir
        The run directory (``run-dir``).
    run_id
        Flower's run id.
    """

    def __init__(self, run_dir: Path, run_id: int | str) -> None:
        self.run_dir = Path(run_dir)
        self.run_id = str(run_id)
        self.checkpoint_dir = self.run_dir / "checkpoints" / self.run_id
        self.log_dir = self.run_dir / "runs" / self.run_id

    @property
    def rounds_path(self) -> Path:
        return self.log_dir / "rounds.jsonl"

    @property
    def reports_dir(self) -> Path:
        """Site reports (``round_XXX/<site>/``) and the federation summary."""
        return self.log_dir / "reports"

    @property
    def status_path(self) -> Path:
        return self.log_dir / "status.json"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoint_dir / CHECKPOINT_PATTERN.format(server_round)

    def write_checkpoint(self, server_round: int, state: dict[str, Any]) -> Path:
        """Save ``state`` (tensors, arrays, plain data) for ``server_round`` atomically."""
        buffer = io.BytesIO()
        torch.save({"round": server_round, **state}, buffer)
        path = self.checkpoint_path(server_round)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def append_round(self, entry: dict[str, Any]) -> None:
        """Add one round's summary to ``rounds.jsonl`` (the whole file is rewritten atomically)."""
        previous = self.rounds_path.read_bytes() if self.rounds_path.exists() else b""
        line = json.dumps(entry, sort_keys=True, allow_nan=False).encode() + b"\n"
        atomic_write_bytes(self.rounds_path, previous + line)

    def write_status(self, status: str, **details: Any) -> None:
        """Record the run's status (``running``, ``completed`` or ``failed``)."""
        payload = {"run_id": self.run_id, "status": status, **details}
        atomic_write_bytes(self.status_path, json.dumps(payload, sort_keys=True).encode())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :meth:`RunFiles.write_checkpoint`."""
    return torch.load(path, map_location="cpu", weights_only=False)


def read_rounds(path: Path) -> list[dict[str, Any]]:
    """Round summaries from a ``rounds.jsonl`` (empty if the file does not exist yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_status(path: Path) -> dict[str, Any] | None:
    """The run status, or ``None`` if the run has not written one yet."""
    if not path.exists():
        return None
    return json.loads(path.read_text())
