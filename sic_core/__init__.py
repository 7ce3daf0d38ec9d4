"""SIC: similarity-based interpretable classification on B-cos networks (pure PyTorch).

Public API::

    list_encoders()                      registered encoder names, the CPU-sized one first
    create_model(encoder, in_channels, num_classes, n_shot=3, proj_dim=128, temperature=10.0)
    explain(model, x, target=None)       logits, evidence, per-support and per-class maps
    train_sic(model, images, labels, TrainConfig(...))
    save_checkpoint(path, model) / load_checkpoint(path)
"""

from sic_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sic_core.encoders import create_encoder, list_encoders, register_encoder
from sic_core.errors import ConfigError, DataError, PrivacyBudgetError, SicfedError, SiteError
from sic_core.explain import (
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
