"""Local training throughput: the SIC step against plain training loops, same batch and device.

Figures are throughput ratios (SIC images/s divided by the anchor's images/s), so they hold
on a noisy shared machine; absolute images/s are quoted only from a GPU.

- ``sic_vs_same_encoder_train_ratio``: the SIC episodic step (queries + ``n_shot`` support
  images per class through one forward, similarity head, BCE) against a plain loop of the
  *same* B-cos encoder with global pooling and a linear head (cross-entropy).
- ``sic_vs_blackbox_train_ratio``: SIC on ``bcos_resnet18`` against torchvision's ResNet-18.
- ``sic_vs_bcos_resnet_train_ratio``: SIC on ``bcos_resnet18`` against the ``bcos``
  package's own B-cos ResNet-18.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from bcos.models.resnet import resnet18 as bcos_package_resnet18
from torch import Tensor, nn

from sic_core import create_model
from sic_core.head import sic_loss
from sic_core.training import episodic_logits

Step = Callable[[], None]


def median_step_seconds(step: Step, device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    timings = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def _plain_step(net: nn.Module, images: Tensor, labels: Tensor) -> Step:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step() -> None:
        loss = F.cross_entropy(net(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sic_step(encoder: str, images: Tensor, labels: Tensor, n_shot: int, **cfg: object) -> Step:
    device = images.device
    model = create_model(encoder, 1, 2, n_shot=n_shot, **cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    supports = torch.rand(2 * n_shot, *images.shape[1:], device=device)
    support_labels = torch.arange(2, device=device).repeat_interleave(n_shot)

    def step() -> None:
        loss = sic_loss(episodic_logits(model, images, supports, support_labels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


class PooledLinear(nn.Module):
    """The SIC model's encoder with global pooling and a linear head: the plain baseline."""

    def __init__(self, encoder: str, **cfg: object) -> None:
        super().__init__()
        self.sic = create_model(encoder, 1, 2, **cfg)
        self.head = nn.Linear(self.sic.embedder.encoder.num_features, 2)

    def forward(self, x: Tensor) -> Tensor:
        features = self.sic.embedder.encoder(self.sic.encode(x))
        return self.head(features.mean(dim=(2, 3)))


def run(
    device: torch.device, *, size: int = 128, batch: int = 32, repeats: int = 5, n_shot: int = 3
) -> dict[str, float]:
    """Measure training throughput (images/s) and the ratios of this module's docstring."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, size, size, generator=generator).to(device)
    labels = (torch.arange(batch) % 2).to(device)
    rgb = images.expand(-1, 3, -1, -1).contiguous()
    encoded_rgb = torch.cat([rgb, 1 - rgb], dim=1)
    warmup = 2

    def per_s(step: Step) -> float:
        return batch / median_step_seconds(step, device, warmup=warmup, repeats=repeats)

    results = {
        "sic_small_images_per_s": per_s(_sic_step("bcos_cnn_small", images, labels, n_shot)),
        "plain_small_images_per_s": per_s(
            _plain_step(PooledLinear("bcos_cnn_small").to(device), images, labels)
        ),
        "sic_resnet18_images_per_s": per_s(_sic_step("bcos_resnet18", images, labels, n_shot)),
        "blackbox_resnet18_images_per_s": per_s(
            _plain_step(torchvision.models.resnet18(num_classes=2).to(device), rgb, labels)
        ),
        "bcos_package_resnet18_images_per_s": per_s(
            _plain_step(bcos_package_resnet18(num_classes=2).to(device), encoded_rgb, labels)
        ),
    }
    results["sic_vs_same_encoder_train_ratio"] = (
        results["sic_small_images_per_s"] / results["plain_small_images_per_s"]
    )
    results["sic_vs_blackbox_train_ratio"] = (
        results["sic_resnet18_images_per_s"] / results["blackbox_resnet18_images_per_s"]
    )
    results["sic_vs_bcos_resnet_train_ratio"] = (
        results["sic_resnet18_images_per_s"] / results["bcos_package_resnet18_images_per_s"]
    )
    return results
