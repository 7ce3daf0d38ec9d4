"""Atomic round checkpoints and the round log of a federation run.

Layout under the run directory (``run-dir`` in the run config)::

    checkpoints/<run-id>/round_001.pt   weights, support set, strategy state, RNG, MLflow ids
    runs/<run-id>/rounds.jsonl          one JSON line per finished round (what the CLI shows)
    runs/<run-id>/status.json           running | completed | failed, with a reason code

Every file is written to a temporary file in the same folder, flushed, fsynced and renamed
over the target, so a crash leaves either the old or the new version, never half a file.

A round checkpoint holds only tensors and plain Python values (dicts, lists, tuples, str,
int, float, bool, None), so ``torch.load(path, weights_only=True)`` reads it without
unpickling code; its ``format`` is :data:`ROUND_CHECKPOINT_FORMAT`.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np

from sic_core.atomic import atomic_write
from sic_core.errors import ConfigError

__all__ = [
    "CHECKPOINT_PATTERN",
    "ROUND_CHECKPOINT_FORMAT",
    "RunFiles",
    "atomic_write_bytes",
    "capture_rng_state",
    "load_checkpoint",
    "read_rounds",
    "read_status",
    "restore_rng_state",
]

CHECKPOINT_PATTERN = "round_{:03d}.pt"

#: The ``format`` entry of every round checkpoint.
ROUND_CHECKPOINT_FORMAT = "sicfed.round/1"


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

    @property
    def audit_path(self) -> Path:
        """The run's hash-chained audit log (:mod:`server.audit`)."""
        return self.log_dir / "audit.jsonl"

    def checkpoint_path(self, server_round: int) -> Path:
        return self.checkpoint_dir / CHECKPOINT_PATTERN.format(server_round)

    def write_checkpoint(self, server_round: int, state: dict[str, Any]) -> Path:
        """Save ``state`` for ``server_round`` atomically.

        ``state`` may hold only tensors and plain Python values: the file must load with
        ``torch.load(weights_only=True)``.
        """
        import torch  # here, not at import: the coordinator CLI reads run files without it

        buffer = io.BytesIO()
        torch.save({"format": ROUND_CHECKPOINT_FORMAT, "round": server_round, **state}, buffer)
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
    """Load a checkpoint written by :meth:`RunFiles.write_checkpoint` (``weights_only``).

    Raises
    ------
    ConfigError
        If the file is missing, does not load with ``weights_only=True`` (e.g. written by a
        sicfed before checkpoints held only tensors and plain values) or is not a round
        checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"round checkpoint: file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(
            f"round checkpoint: {path} does not load with torch.load(weights_only=True): "
            f"{type(error).__name__}"
        ) from error
    if not isinstance(state, dict) or state.get("format") != ROUND_CHECKPOINT_FORMAT:
        raise ConfigError(f"round checkpoint: {path} has no format {ROUND_CHECKPOINT_FORMAT!r}")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The Python, numpy and torch global RNG states, as tensors and plain values."""
    import torch

    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs to a state from :func:`capture_rng_state`."""
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


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
