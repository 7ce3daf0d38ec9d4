"""The encoders pad each B-cos convolution's input explicitly; every mode stays exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bcos.modules import BcosConv2d
from torch import nn

from sic_core import ConfigError, create_model, explain, list_encoders
from sic_core.encoders import BcosConvBlock

SIZES = {"bcos_cnn_small": {"width": 8}, "bcos_resnet18": {"width": 8}}


@pytest.mark.parametrize("name", list_encoders())
@pytest.mark.parametrize("padding", ["replicate", "reflect", "zeros"])
def test_every_padding_mode_keeps_explanations_complete(name: str, padding: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 1, 2, n_shot=2, proj_dim=16, padding=padding, **SIZES[name])
    model.set_support(torch.rand(4, 16) + 0.05, torch.tensor([0, 0, 1, 1]))
    # 64 px: reflect padding needs feature maps wider than one pixel (ResNet-18 stage 4).
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    result = explain(model, x)
    target = result.logits - result.bias
    relative = (result.class_maps.sum(dim=(2, 3)) - target).abs() / target.abs()
    assert relative.max() < 1e-4


def test_replicate_is_the_default_and_pads_before_the_convolution() -> None:
    block = create_model("bcos_cnn_small", 1, 2).embedder.encoder.layers[0]
    assert isinstance(block[0], nn.ReplicationPad2d)
    assert isinstance(block[1], BcosConv2d)


def test_the_patch_norm_sees_the_padded_patch() -> None:
    """|cos| <= 1 at the border too: the norm is taken over the same (replicated) patch."""
    torch.manual_seed(0)
    block = BcosConvBlock(2, 4, kernel=3, stride=1, norm="none", b=2, padding="replicate")
    x = torch.rand(2, 2, 9, 9)
    out = block(x)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    weight = block[1].linear.weight
    unit = weight / weight.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    projection = F.conv2d(padded, unit)
    patch_norm = F.unfold(padded, 3).norm(dim=1).view(2, 1, 9, 9)
    torch.testing.assert_close(
        out, projection * projection.abs() / patch_norm, rtol=1e-4, atol=1e-5
    )


def test_an_unknown_padding_mode_names_the_field() -> None:
    with pytest.raises(ConfigError, match="padding"):
        create_model("bcos_cnn_small", 1, 2, padding="circular")
