"""B-cos layers as SIC.md defines them, on random weights and inputs (CPU, float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bcos.modules import BcosConv2d, BcosLinear


def _unit(weight: torch.Tensor) -> torch.Tensor:
    return weight / weight.flatten(1).norm(dim=1).view(-1, *[1] * (weight.dim() - 1))


def test_b1_linear_equals_plain_linear_with_unit_filters() -> None:
    torch.manual_seed(0)
    layer = BcosLinear(7, 5, b=1)
    x = torch.randn(4, 7)
    expected = F.linear(x, _unit(layer.linear.weight))
    torch.testing.assert_close(layer(x), expected)


def test_b1_conv_equals_plain_conv_with_unit_filters() -> None:
    torch.manual_seed(0)
    layer = BcosConv2d(3, 4, kernel_size=3, padding=1, b=1)
    x = torch.randn(2, 3, 9, 9)
    expected = F.conv2d(x, _unit(layer.linear.weight), padding=1)
    torch.testing.assert_close(layer(x), expected)


def test_b2_linear_is_signed_square_over_input_norm() -> None:
    torch.manual_seed(0)
    layer = BcosLinear(7, 5, b=2)
    x = torch.randn(4, 7)
    projection = F.linear(x, _unit(layer.linear.weight))
    expected = projection * projection.abs() / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_b2_conv_patch_norms_equal_an_explicit_unfold() -> None:
    torch.manual_seed(0)
    layer = BcosConv2d(3, 4, kernel_size=3, stride=2, padding=1, b=2)
    x = torch.randn(2, 3, 9, 9)
    patches = F.unfold(x, kernel_size=3, padding=1, stride=2)  # (B, C*9, L)
    patch_norms = patches.norm(dim=1).view(2, 1, 5, 5)
    torch.testing.assert_close(layer.calc_patch_norms(x), patch_norms, rtol=1e-4, atol=1e-5)
    projection = F.conv2d(x, _unit(layer.linear.weight), stride=2, padding=1)
    expected = projection * projection.abs() / patch_norms
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_output_is_invariant_to_rescaling_a_filter() -> None:
    torch.manual_seed(0)
    layer = BcosConv2d(3, 4, kernel_size=3, padding=1, b=2)
    x = torch.randn(2, 3, 9, 9)
    before = layer(x)
    with torch.no_grad():
        layer.linear.weight[1] *= 7.5
    torch.testing.assert_close(layer(x), before)
