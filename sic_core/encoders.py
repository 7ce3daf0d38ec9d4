"""B-cos encoders assembled from the ``bcos`` package's layers, and their registry.

We assemble the networks ourselves instead of using ``bcos.models`` because its ResNet
blocks add residuals in place (``out += identity``, which breaks Opacus' hooks) and its
default norms use batch statistics (wrong per-sample gradients, and running statistics that
must not be averaged across non-IID sites). Every norm here is per-sample and bias-free, so
each encoder is exactly linear in its (encoded) input once the dynamic scales are detached.

An encoder maps the *encoded* input ``x~ = [x, 1 - x]`` of shape ``(B, 2*C_in, H, W)`` to a
feature map ``(B, num_features, h, w)`` (``forward_features``; ``forward`` is the same).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from bcos.modules import BcosConv2d
from bcos.modules.norms.uncentered_norms import GNLayerNormUncentered2d, PositionNormUncentered2d
from torch import Tensor, nn

from sic_core.errors import ConfigError

__all__ = ["Encoder", "create_encoder", "list_encoders", "register_encoder"]

log = logging.getLogger(__name__)

NormKind = Literal["position", "layer", "none"]
PaddingMode = Literal["replicate", "reflect", "zeros"]


def bias_free_norm(kind: NormKind, channels: int) -> nn.Module:
    """A per-sample, uncentred norm with a learnable scale and no bias.

    A bias would break the exact linearity that makes explanations complete, so it is
    removed from the ``bcos`` modules after construction.
    """
    if kind == "none":
        return nn.Identity()
    if kind == "position":
        norm: nn.Module = PositionNormUncentered2d(channels)
    elif kind == "layer":
        norm = GNLayerNormUncentered2d(channels)
    else:
        raise ConfigError(f"norm: expected one of 'position', 'layer', 'none', got {kind!r}")
    norm.register_parameter("bias", None)
    return norm


class Encoder(nn.Module):
    """Base class: a B-cos feature extractor over the encoded input.

    Attributes
    ----------
    in_channels
        Channels of the *encoded* input (``2 * C_in``).
    num_features
        Channels of the feature map returned by :meth:`forward_features`.
    """

    in_channels: int
    num_features: int

    def forward_features(self, encoded: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, encoded: Tensor) -> Tensor:
        return self.forward_features(encoded)


def spatial_padding(mode: PaddingMode, kernel: int) -> nn.Module:
    """Explicit ``kernel // 2`` padding in front of a B-cos convolution.

    Why explicit: ``BcosConv2d(padding_mode=...)`` pads the convolution but computes its
    patch norms with zero padding, so border cosines would be measured against the wrong
    patch. Padding the input once gives the convolution and its norm the same patch.
    Replicating the border (the default) matters for learning: with zero padding, the
    encoded input ``[x, 1 - x]`` drops to 0 outside the image in *both* channels, a
    pattern no interior patch has, and 63 % of an untrained encoder's global-max-pool
    maxima sat on the border ring (44 % of a 64 px image) instead of on anatomy. Copying,
    mirroring and zero-filling are all linear in the input, so explanations stay exact.
    """
    if mode not in ("replicate", "reflect", "zeros"):
        raise ConfigError(f"padding: expected one of 'replicate', 'reflect', 'zeros', got {mode!r}")
    size = kernel // 2
    if size == 0:
        return nn.Identity()
    if mode == "replicate":
        return nn.ReplicationPad2d(size)
    if mode == "reflect":
        return nn.ReflectionPad2d(size)
    return nn.ZeroPad2d(size)


class BcosConvBlock(nn.Sequential):
    """Padding, ``BcosConv2d`` (no bias), then a bias-free per-sample norm."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        kernel: int,
        stride: int,
        norm: NormKind,
        b: float,
        max_out: int = 1,
        padding: PaddingMode = "replicate",
    ) -> None:
        super().__init__(
            spatial_padding(padding, kernel),
            BcosConv2d(in_ch, out_ch, kernel_size=kernel, stride=stride, b=b, max_out=max_out),
            bias_free_norm(norm, out_ch),
        )


class SmallBcosCNN(Encoder):
    """A five-layer B-cos CNN that trains on a CPU in minutes at 64-128 px.

    Parameters
    ----------
    in_channels
        Channels of the encoded input (2 for grey images).
    width
        Channels of the first layer; later layers use ``2 * width`` and ``4 * width``.
    norm
        Per-sample norm after each convolution.
    b
        B-cos exponent of every layer (B = 1 makes each layer an ordinary convolution).
        3 rather than the reference's 2: from scratch on SynthCXR ``default`` (64 px, site
        A, ``TrainConfig`` defaults, seeds 0-2) it reached validation AUROC 0.9 in 8 / 9 / 6
        epochs with mean best 0.973, against 7 / 11 / 8 and 0.956 at B = 2 (README, "How
        SIC learns from scratch").
    max_out
        MaxOut units per channel (1: none).
    padding
        How each convolution's input is padded (:func:`spatial_padding`).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        width: int = 32,
        norm: NormKind = "position",
        b: float = 3.0,
        max_out: int = 1,
        padding: PaddingMode = "replicate",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        widths = [width, 2 * width, 2 * width, 4 * width, 4 * width]
        strides = [2, 1, 2, 2, 1]
        layers: list[nn.Module] = []
        previous = in_channels
        for out_ch, stride in zip(widths, strides, strict=True):
            layers.append(
                BcosConvBlock(
                    previous,
                    out_ch,
                    kernel=3,
                    stride=stride,
                    norm=norm,
                    b=b,
                    max_out=max_out,
                    padding=padding,
                )
            )
            previous = out_ch
        self.layers = nn.Sequential(*layers)
        self.num_features = previous

    def forward_features(self, encoded: Tensor) -> Tensor:
        return self.layers(encoded)


class BcosBasicBlock(nn.Module):
    """ResNet basic block of B-cos convolutions with an out-of-place residual sum."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int,
        norm: NormKind,
        b: float,
        padding: PaddingMode = "replicate",
    ) -> None:
        super().__init__()
        conv = partial(BcosConvBlock, norm=norm, b=b, padding=padding)
        self.conv1 = conv(in_ch, out_ch, kernel=3, stride=stride)
        self.conv2 = conv(out_ch, out_ch, kernel=3, stride=1)
        self.shortcut: nn.Module = (
            conv(in_ch, out_ch, kernel=1, stride=stride)
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x)) + self.shortcut(x)


class BcosResNet18(Encoder):
    """A ResNet-18-shaped B-cos encoder (GPU-sized): stem, four stages of two blocks.

    The stem is torchvision's (7x7 stride-2 convolution, 3x3 stride-2 max pool); max pooling
    selects one input per window, so the network stays exactly linear in explanation mode.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        width: int = 64,
        norm: NormKind = "position",
        b: float = 2.0,
        padding: PaddingMode = "replicate",
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = nn.Sequential(
            BcosConvBlock(in_channels, width, kernel=7, stride=2, norm=norm, b=b, padding=padding),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        previous = width
        for stage, stride in enumerate([1, 2, 2, 2]):
            out_ch = width * 2**stage
            block = partial(BcosBasicBlock, norm=norm, b=b, padding=padding)
            stages.append(block(previous, out_ch, stride=stride))
            stages.append(block(out_ch, out_ch, stride=1))
            previous = out_ch
        self.stages = nn.Sequential(*stages)
        self.num_features = previous

    def forward_features(self, encoded: Tensor) -> Tensor:
        return self.stages(self.stem(encoded))


EncoderFactory = Callable[..., Encoder]
_REGISTRY: dict[str, EncoderFactory] = {}


def register_encoder(name: str, factory: EncoderFactory) -> None:
    """Add an encoder factory ``factory(in_channels, **cfg) -> Encoder`` under ``name``."""
    if name in _REGISTRY:
        raise ConfigError(f"encoder {name!r} is already registered")
    _REGISTRY[name] = factory


register_encoder("bcos_cnn_small", SmallBcosCNN)
register_encoder("bcos_resnet18", BcosResNet18)


def list_encoders() -> list[str]:
    """Registered encoder names, the CPU-sized one first."""
    return list(_REGISTRY)


def create_encoder(
    name: str, in_channels: int, *, weights: str | Path | None = None, **cfg: object
) -> Encoder:
    """Build a registered encoder.

    Parameters
    ----------
    name
        One of :func:`list_encoders`.
    in_channels
        Channels of the encoded input (``2 * C_in``).
    weights
        Optional local file with a state dict for this encoder (never downloaded).
    **cfg
        Keyword arguments of the encoder class (``width``, ``norm``, ``b``).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"encoder: unknown name {name!r}; expected one of {list_encoders()}")
    encoder = _REGISTRY[name](in_channels, **cfg)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"encoder weights: file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            encoder.load_state_dict(state)
        except RuntimeError as error:
            raise ConfigError(f"encoder weights: {path} does not fit encoder {name!r}") from error
        log.info("loaded encoder weights for %s", name)
    return encoder
