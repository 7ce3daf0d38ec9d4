"""The SIC model: B-cos encoder -> pooled B-cos projection -> similarity to support vectors.

The model owns its input spec: callers pass images ``x`` in ``[0, 1]`` of shape
``(B, C_in, H, W)``; the model validates the range and encodes ``x~ = [x, 1 - x]`` itself
(B-cos networks have no bias, and the inverse channels give dark regions equal norm).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from bcos.modules import BcosLinear
from torch import Tensor, nn

from sic_core.encoders import Encoder, create_encoder
from sic_core.errors import ConfigError
from sic_core.head import bcos_similarity, class_scores, logit_bias

__all__ = ["Embedder", "ModelConfig", "Pooling", "SICModel", "check_unit_interval", "create_model"]

Pooling = Literal["max", "avg"]


def check_unit_interval(x: Tensor, *, name: str = "x") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor with every value in ``[0, 1]``."""
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point image tensor, got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
        raise ValueError(
            f"{name}: image values must lie in [0, 1] (got min {x.min().item():.4g}, "
            f"max {x.max().item():.4g}); scale images before calling the model"
        )


def encode_input(x: Tensor) -> Tensor:
    """``x~ = [x, 1 - x]`` along channels, after checking ``x`` is in ``[0, 1]``."""
    check_unit_interval(x)
    return torch.cat([x, 1 - x], dim=1)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a :class:`SICModel` (stored in checkpoints)."""

    encoder: str
    in_channels: int
    num_classes: int
    n_shot: int = 3
    proj_dim: int = 128
    temperature: float = 10.0
    pool: Pooling = "max"
    encoder_cfg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_classes", "n_shot", "proj_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes: expected at least 2, got {self.num_classes}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature: expected > 0, got {self.temperature}")
        if self.pool not in ("max", "avg"):
            raise ConfigError(f"pool: expected 'max' or 'avg', got {self.pool!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Embedder(nn.Module):
    """Encoded image -> embedding: encoder, global pool, B-cos projection, ReLU.

    Separate from the head so that DP-SGD can wrap exactly the trainable part.

    Pooling is global *max* by default, a recorded deviation from SIC.md's global average:
    SynthCXR lesions cover about 1 % of the image, and after average pooling the lesion's
    share of every feature is ~1 %, so every embedding points the same way. Trained from
    scratch on SynthCXR easy (64 px, site A), the average-pooled small encoder stayed at
    chance for 12 epochs and could not even fit 64 training images (loss 0.68), while the
    max-pooled one fitted them (loss 0.20) and reached validation AUROC 0.92 in 6 epochs.
    Max pooling selects one position per channel, so the network stays exactly linear in
    explanation mode and completeness still holds. ``pool="avg"`` is the reference's
    choice (e.g. for a pretrained encoder on large findings).
    """

    def __init__(self, encoder: Encoder, proj_dim: int, pool: Pooling = "max") -> None:
        super().__init__()
        self.encoder = encoder
        self.pool = pool
        self.projection = BcosLinear(encoder.num_features, proj_dim, b=2)
        self.activation = nn.ReLU()

    def forward(self, encoded: Tensor) -> Tensor:
        features = self.encoder(encoded)
        pooled = features.amax(dim=(2, 3)) if self.pool == "max" else features.mean(dim=(2, 3))
        return self.activation(self.projection(pooled))


class SICModel(nn.Module):
    """Similarity-based interpretable classifier.

    ``SICModel(x)`` returns logits ``(B, C)``: ``z_c = sum_{k: y_k = c} sim(f(x), s_k) / T + b``
    against the current support vectors (buffers ``support_vectors (K, D)`` and
    ``support_labels (K,)``, set with :meth:`set_support`).

    Attributes
    ----------
    temperature
        ``T`` (10 by default).
    logit_bias
        ``b = -log(max(C - 1, 2))``.
    explaining
        True inside :func:`sic_core.explanations.explanation_mode` (dynamic scales detached).
    """

    support_vectors: Tensor
    support_labels: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        self.n_shot = config.n_shot
        self.temperature = config.temperature
        self.logit_bias = logit_bias(config.num_classes)
        self.explaining = False
        encoder = create_encoder(config.encoder, 2 * config.in_channels, **config.encoder_cfg)
        self.embedder = Embedder(encoder, config.proj_dim, config.pool)
        num_supports = config.num_classes * config.n_shot
        self.register_buffer("support_vectors", torch.zeros(num_supports, config.proj_dim))
        self.register_buffer(
            "support_labels", torch.arange(config.num_classes).repeat_interleave(config.n_shot)
        )

    def encode(self, x: Tensor) -> Tensor:
        """Validate ``x`` (B, C_in, H, W) in [0, 1] and return ``[x, 1 - x]``."""
        if x.dim() != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"x: expected shape (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return encode_input(x)

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings ``(B, D)`` (non-negative) of images ``x`` in [0, 1]."""
        return self.embedder(self.encode(x))

    def set_support(self, vectors: Tensor, labels: Tensor) -> None:
        """Replace the support set.

        Parameters
        ----------
        vectors
            ``(K, D)`` support vectors.
        labels
            ``(K,)`` integer class of each vector, in ``[0, C)``.
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.config.proj_dim:
            raise ValueError(
                f"support vectors: expected shape (K, {self.config.proj_dim}), "
                f"got {tuple(vectors.shape)}"
            )
        if labels.shape != (vectors.shape[0],):
            raise ValueError(
                f"support labels: expected shape ({vectors.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"support labels: expected values in [0, {self.num_classes})")
        if not torch.isfinite(vectors).all():
            raise ValueError("support vectors: contain NaN or Inf")
        device = self.support_vectors.device
        self.support_vectors = vectors.detach().to(device, torch.float32).clone()
        self.support_labels = labels.detach().to(device, torch.long).clone()

    def similarities(self, queries: Tensor, supports: Tensor | None = None) -> Tensor:
        """B-cos similarities ``(B, K)`` of embeddings to supports (default: the model's)."""
        supports = self.support_vectors if supports is None else supports
        return bcos_similarity(queries, supports, detach_scale=self.explaining)

    def evidence(self, queries: Tensor, supports: Tensor | None = None) -> Tensor:
        """Evidence ``e_k = sim(q, s_k) / T``, shape ``(B, K)``."""
        return self.similarities(queries, supports) / self.temperature

    def logits_from_embeddings(
        self,
        queries: Tensor,
        supports: Tensor | None = None,
        support_labels: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(B, C)`` of embeddings against a support set (default: the model's)."""
        labels = self.support_labels if support_labels is None else support_labels
        evidence = self.evidence(queries, supports)
        return class_scores(evidence, labels, self.num_classes) + self.logit_bias

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_from_embeddings(self.embed(x))


def create_model(
    encoder: str,
    in_channels: int,
    num_classes: int,
    n_shot: int = 3,
    proj_dim: int = 128,
    temperature: float = 10.0,
    pool: Pooling = "max",
    **encoder_cfg: Any,
) -> SICModel:
    """Build a :class:`SICModel` on a registered encoder (see :func:`list_encoders`).

    Examples
    --------
    >>> model = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
    >>> model.support_vectors.shape
    torch.Size([6, 128])
    """
    config = ModelConfig(
        encoder=encoder,
        in_channels=in_channels,
        num_classes=num_classes,
        n_shot=n_shot,
        proj_dim=proj_dim,
        temperature=temperature,
        pool=pool,
        encoder_cfg=dict(encoder_cfg),
    )
    return SICModel(config)
