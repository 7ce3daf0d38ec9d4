"""Initial weights from a checkpoint (the run config's ``initial-weights``).

The checkpoint is either a sicfed model checkpoint (:mod:`sic_core.checkpoint`), typically a
public warm start made with ``python -m client pretrain`` on public images only, or a server
round checkpoint (``checkpoints/<run id>/round_NNN.pt``, :mod:`server.checkpoint`) of an
earlier federation; the federation then starts from its weights instead of a random
initialisation. Its architecture must be the run's (encoder, classes, shots, embedding size,
one input channel).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.checkpoint import load_checkpoint as load_round_checkpoint
from sic_core.checkpoint import load_checkpoint
from sic_core.errors import ConfigError
from sic_core.model import SICModel

__all__ = ["load_initial_weights"]

log = logging.getLogger(__name__)


def load_initial_weights(model: SICModel, path: str | Path) -> dict[str, Any]:
    """Load the weights of the checkpoint at ``path`` into ``model``; return its metadata.

    Raises
    ------
    ConfigError
        (naming ``initial-weights``) if the file is missing or unreadable, or its model
        differs from ``model``'s architecture.
    """
    path = Path(path).expanduser().resolve()
    try:
        round_state = load_round_checkpoint(path)
    except ConfigError:
        round_state = None
    if round_state is not None:
        theirs_model, metadata = _model_of_round(round_state, path), {"kind": "round checkpoint"}
    else:
        try:
            checkpoint = load_checkpoint(path)
        except ConfigError as error:
            raise ConfigError(
                f"initial-weights: {error} (expected a `python -m client pretrain` checkpoint "
                "or a server round_NNN.pt)"
            ) from None
        theirs_model, metadata = checkpoint.model, dict(checkpoint.metadata)
    theirs, ours = theirs_model.config, model.config
    fields = ("encoder", "in_channels", "num_classes", "n_shot", "proj_dim", "pool")
    differing = [
        f"{name} {getattr(theirs, name)!r} (run: {getattr(ours, name)!r})"
        for name in (*fields, "temperature", "encoder_cfg")
        if getattr(theirs, name) != getattr(ours, name)
    ]
    if differing:
        raise ConfigError(f"initial-weights: {path} holds another model: {', '.join(differing)}")
    model.load_state_dict(theirs_model.state_dict())
    log.info("initial weights from %s (%s)", path, metadata.get("kind", "checkpoint"))
    return metadata


def _model_of_round(state: dict[str, Any], path: Path) -> SICModel:
    # Imported here: the registry pulls in MLflow, which only this kind of start needs.
    from server.registry import ModelRegistryError, model_from_round_checkpoint

    try:
        return model_from_round_checkpoint(state)
    except ModelRegistryError as error:
        raise ConfigError(f"initial-weights: {path}: {error}") from None
