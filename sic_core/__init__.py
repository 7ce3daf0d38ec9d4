"""SIC: similarity-based interpretable classification on B-cos networks (pure PyTorch).

Public API::

    list_encoders()                      registered encoder names, the CPU-sized one first
    create_model(encoder, in_channels, num_classes, n_shot=3, proj_dim=128, temperature=10.0)
    explain(model, x, target=None)       logits, evidence, per-support and per-class maps
    train_sic(model, images, labels, TrainConfig(...))
    save_checkpoint(path, model) / load_checkpoint(path)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sic_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from sic_core.encoders import create_encoder, list_encoders, register_encoder
    from sic_core.errors import ConfigError, DataError, PrivacyBudgetError, SicfedError, SiteError
    from sic_core.explanations import (
        Explanation,
        SupportExplanation,
        colour_explanation,
        explain,
        explain_support,
        explanation_mode,
    )
    from sic_core.federated import unit_filter_state_dict
    from sic_core.model import ModelConfig, SICModel, create_model
    from sic_core.support import (
        ClusterStatistics,
        SupportSet,
        anchor_support,
        cluster_statistics,
        embed_all,
        merge_cluster_statistics,
        nearest_local_support,
        select_support,
    )
    from sic_core.training import TrainConfig, TrainHistory, train_sic

# Names load on first use: `from sic_core.errors import ...` (CLIs, --help) must not pay
# for importing torch and the model.
_EXPORTS: dict[str, str] = {
    "Checkpoint": "sic_core.checkpoint",
    "load_checkpoint": "sic_core.checkpoint",
    "save_checkpoint": "sic_core.checkpoint",
    "create_encoder": "sic_core.encoders",
    "list_encoders": "sic_core.encoders",
    "register_encoder": "sic_core.encoders",
    "ConfigError": "sic_core.errors",
    "DataError": "sic_core.errors",
    "PrivacyBudgetError": "sic_core.errors",
    "SicfedError": "sic_core.errors",
    "SiteError": "sic_core.errors",
    "Explanation": "sic_core.explanations",
    "SupportExplanation": "sic_core.explanations",
    "colour_explanation": "sic_core.explanations",
    "explain": "sic_core.explanations",
    "explain_support": "sic_core.explanations",
    "explanation_mode": "sic_core.explanations",
    "unit_filter_state_dict": "sic_core.federated",
    "ModelConfig": "sic_core.model",
    "SICModel": "sic_core.model",
    "create_model": "sic_core.model",
    "ClusterStatistics": "sic_core.support",
    "SupportSet": "sic_core.support",
    "anchor_support": "sic_core.support",
    "cluster_statistics": "sic_core.support",
    "embed_all": "sic_core.support",
    "merge_cluster_statistics": "sic_core.support",
    "nearest_local_support": "sic_core.support",
    "select_support": "sic_core.support",
    "TrainConfig": "sic_core.training",
    "TrainHistory": "sic_core.training",
    "train_sic": "sic_core.training",
}

__all__ = [
    "Checkpoint",
    "ClusterStatistics",
    "ConfigError",
    "DataError",
    "Explanation",
    "ModelConfig",
    "PrivacyBudgetError",
    "SICModel",
    "SicfedError",
    "SiteError",
    "SupportExplanation",
    "SupportSet",
    "TrainConfig",
    "TrainHistory",
    "anchor_support",
    "cluster_statistics",
    "colour_explanation",
    "create_encoder",
    "create_model",
    "embed_all",
    "explain",
    "explain_support",
    "explanation_mode",
    "list_encoders",
    "load_checkpoint",
    "merge_cluster_statistics",
    "nearest_local_support",
    "register_encoder",
    "save_checkpoint",
    "select_support",
    "train_sic",
    "unit_filter_state_dict",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sic_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
