"""Model checkpoints: weights, support vectors and labels, and the config to rebuild the model.

Written atomically (temporary file, fsync, rename) so a crash never leaves a half-written
checkpoint in place of a good one; read with ``weights_only=True`` (no pickled code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sic_core.atomic import atomic_write
from sic_core.errors import ConfigError
from sic_core.model import ModelConfig, SICModel

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "atomic_torch_save",
    "load_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "sicfed.sic/1"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (support set included) and its metadata."""

    model: SICModel
    support_indices: Tensor | None
    metadata: dict[str, Any]


def atomic_torch_save(payload: object, path: Path) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically."""
    atomic_write(path, lambda stream: torch.save(payload, stream))


def save_checkpoint(
    path: str | Path,
    model: SICModel,
    *,
    support_indices: Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (weights, support vectors, labels, config) and metadata to ``path``.

    ``metadata`` may hold only tensors, numbers, strings, bools, ``None`` and lists/dicts of
    them (it is read back with ``weights_only=True``).
    """
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "support_indices": None if support_indices is None else support_indices.cpu(),
        "metadata": metadata or {},
    }
    atomic_torch_save(payload, path)
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model stored at ``path`` (see :func:`save_checkpoint`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint: file {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ConfigError(f"checkpoint: {path} is not a readable sicfed checkpoint") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint: {path} has no format {CHECKPOINT_FORMAT!r}")
    model = SICModel(ModelConfig(**payload["model_config"]))
    state = payload["state_dict"]
    model.set_support(state["support_vectors"], state["support_labels"])
    model.load_state_dict(state)
    return Checkpoint(
        model=model, support_indices=payload["support_indices"], metadata=payload["metadata"]
    )
