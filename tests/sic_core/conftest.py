"""Shared fixtures: tiny disc-lesion images (a stand-in for SynthCXR in sic_core tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def make_disc_images(
    n: int, size: int = 32, *, seed: int = 0, contrast: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth random backgrounds; label 1 images carry a bright disc (the lesion).

    Returns images ``(n, 1, size, size)`` in [0, 1], labels ``(n,)`` and lesion masks
    ``(n, 1, size, size)`` (all zero for negatives).
    """
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=generator)
    background = 0.3 + 0.2 * F.interpolate(coarse, size=(size, size), mode="bicubic")
    background = background + 0.03 * torch.randn(n, 1, size, size, generator=generator)
    labels = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        if labels[i] == 1:
            radius = size * (0.1 + 0.05 * torch.rand(1, generator=generator).item())
            cy, cx = (size * (0.2 + 0.6 * torch.rand(2, generator=generator))).tolist()
            masks[i, 0] = (((yy - cy) ** 2 + (xx - cx) ** 2) <= radius**2).float()
    images = (background + contrast * masks).clamp(0, 1)
    return images, labels, masks


@pytest.fixture
def disc_images():
    """The :func:`make_disc_images` generator (tests call it with their own sizes)."""
    return make_disc_images
