"""DP-SGD overhead: one DP-SGD step against one plain step of the same model and batch.

Both steps score the queries against fixed support vectors (the DP mode's loss), so the
ratio isolates what Opacus adds: per-sample gradients, per-sample clipping and noise.
``dp_overhead_ratio`` = DP step time / plain step time (target ≤ 1.6; Opacus' own anchor on
a B-cos CNN was 2.24). Opacus' gradient-sample modes are measured side by side.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from bench.training_bench import median_step_seconds
from sic_core import anchor_support, create_model
from sic_core.head import sic_loss
from sic_core.training import fixed_support_logits

__all__ = ["run"]


def _steps(
    encoder: str, device: torch.device, size: int, batch: int, mode: str | None
) -> Callable[[], None]:
    torch.manual_seed(0)
    model = create_model(encoder, 1, 2).to(device)
    anchors = anchor_support(2, model.n_shot, model.config.proj_dim)
    support = type(anchors)(anchors.vectors.to(device), anchors.labels.to(device), anchors.indices)
    images = torch.rand(batch, 1, size, size, device=device)
    labels = (torch.arange(batch) % 2).to(device)
    optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    embedder = None
    if mode is not None:
        embedder = GradSampleModule(
            model.embedder,
            batch_first=True,
            loss_reduction="mean",
            force_functorch=mode == "functorch",
        )
        optimizer = DPOptimizer(
            optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch
        )

    def step() -> None:
        loss = sic_loss(fixed_support_logits(model, images, support, embedder=embedder), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def run(
    device: torch.device,
    *,
    encoder: str = "bcos_cnn_small",
    size: int = 64,
    batch: int = 32,
    repeats: int = 5,
) -> dict[str, float]:
    """Median step times of plain and DP-SGD training; the ratios are the figures."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = median_step_seconds(
            _steps(encoder, device, size, batch, None), device, warmup=1, repeats=repeats
        )
        hooks = median_step_seconds(
            _steps(encoder, device, size, batch, "hooks"), device, warmup=1, repeats=repeats
        )
        functorch = median_step_seconds(
            _steps(encoder, device, size, batch, "functorch"), device, warmup=1, repeats=repeats
        )
    return {
        "dp_overhead_ratio": min(hooks, functorch) / plain,
        "dp_overhead_ratio_hooks": hooks / plain,
        "dp_overhead_ratio_functorch": functorch / plain,
    }
