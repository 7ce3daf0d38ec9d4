"""DP-SGD for local SIC training with Opacus (sample-level DP; the privacy unit is one image).

Supports are held fixed at the current global support vectors (already released under DP),
so each query's loss depends only on its own image and public values and per-sample clipping
bounds every image's influence, as DP-SGD requires. Only ``model.embedder`` is trainable (the
head has no parameters), so Opacus wraps exactly that.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings

import torch
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, TensorDataset

from client.privacy.ledger import Mechanism
from sic_core import SICModel, SupportSet
from sic_core.errors import ConfigError
from sic_core.head import per_sample_sic_loss, sic_loss
from sic_core.model import check_unit_interval
from sic_core.training import Augment, EpochRecord, TrainConfig, TrainHistory, fixed_support_logits

__all__ = ["dp_model_issues", "plan_dp_sgd", "train_dp_sgd", "validate_for_dp"]

log = logging.getLogger(__name__)

_ORACLE_TOLERANCE = 1e-4


def _oracle_error(model: SICModel, support: SupportSet) -> float:
    """Largest relative gap between Opacus per-sample gradients and a per-example loop.

    Runs on a float64 copy with three tiny random images: cheap enough for every start-up.
    """
    probe = copy.deepcopy(model).double().cpu()
    vectors, labels = support.vectors.double().cpu(), support.labels.cpu()
    fixed = SupportSet(vectors, labels, support.indices)
    images = torch.rand(3, probe.config.in_channels, 32, 32, dtype=torch.float64)
    targets = torch.arange(3) % probe.num_classes
    wrapped = GradSampleModule(probe.embedder, loss_reduction="sum")
    try:
        per_sample_sic_loss(
            fixed_support_logits(probe, images, fixed, embedder=wrapped), targets
        ).sum().backward()
        parameters = [p for p in probe.embedder.parameters() if p.requires_grad]
        vectorised = [p.grad_sample.detach().clone() for p in parameters]
    finally:
        wrapped._close()
    worst = 0.0
    for i in range(images.shape[0]):
        probe.embedder.zero_grad(set_to_none=True)
        per_sample_sic_loss(
            fixed_support_logits(probe, images[i : i + 1], fixed), targets[i : i + 1]
        ).sum().backward()
        for parameter, rows in zip(parameters, vectorised, strict=True):
            expected = parameter.grad if parameter.grad is not None else torch.zeros_like(rows[i])
            gap = (rows[i] - expected).norm() / expected.norm().clamp_min(1e-12)
            worst = max(worst, float(gap))
    return worst


def dp_model_issues(model: SICModel, support: SupportSet) -> list[str]:
    """Every reason ``model`` cannot be trained with DP-SGD (empty when it can).

    Checks with ``isinstance`` (Opacus' own validator matches exact types, so a BatchNorm
    subclass would pass it and train with wrong per-sample gradients while reporting an ε),
    then the per-sample-gradient oracle.
    """
    issues = []
    for name, module in model.embedder.named_modules():
        if isinstance(module, _BatchNorm | nn.InstanceNorm2d | nn.SyncBatchNorm):
            issues.append(f"{name or 'embedder'}: batch-statistics norm {type(module).__name__}")
        has_parameters = any(True for _ in module.parameters(recurse=False))
        if has_parameters and any(True for _ in module.buffers(recurse=False)):
            issues.append(f"{name or 'embedder'}: trainable module with buffers")
    if not issues:
        error = _oracle_error(model, support)
        if error > _ORACLE_TOLERANCE:
            issues.append(f"per-sample gradient oracle: relative error {error:.2e}")
    return issues


def validate_for_dp(model: SICModel, support: SupportSet) -> None:
    """Raise :class:`ConfigError` listing :func:`dp_model_issues` if there are any."""
    issues = dp_model_issues(model, support)
    if issues:
        raise ConfigError("model cannot be trained with DP-SGD: " + "; ".join(issues))


def plan_dp_sgd(
    num_images: int, config: TrainConfig, *, noise_multiplier: float, run_id: str, round_: int
) -> Mechanism:
    """The mechanism one round of local DP-SGD applies: Poisson rate ``B / N``, ``E / q`` steps."""
    if num_images < 1:
        raise ConfigError("DP-SGD: the site has no training images")
    sample_rate = min(1.0, config.batch_size / num_images)
    steps = config.epochs * math.ceil(1 / sample_rate)
    return Mechanism(
        kind="dp-sgd",
        run_id=run_id,
        round=round_,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
    )


def train_dp_sgd(
    model: SICModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    support: SupportSet,
    config: TrainConfig,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    augment: Augment | None = None,
) -> TrainHistory:
    """Train ``model.embedder`` with DP-SGD against fixed supports.

    Poisson sampling at rate ``batch_size / N``, per-sample clipping to ``max_grad_norm``,
    Gaussian noise ``noise_multiplier * max_grad_norm``, AdamW. The number of steps equals
    :func:`plan_dp_sgd`'s, which the caller records in the ledger. Runs on the model's
    device (Opacus' per-sample gradients and noise there); ``images`` stay on the host.
    """
    check_unit_interval(images, name="images")
    device = model.support_vectors.device
    generator = torch.Generator().manual_seed(config.seed)
    # The images stay in host memory; on a GPU the loader hands out pinned batches, so the
    # copy to the device can overlap with the step before it.
    on_gpu = device.type == "cuda"
    loader = DataLoader(
        TensorDataset(images, labels.long()),
        batch_size=config.batch_size,
        generator=generator,
        pin_memory=on_gpu,
    )
    optimizer = torch.optim.AdamW(
        model.embedder.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off; the ledger, not this engine, does accounting.
        warnings.simplefilter("ignore", UserWarning)
        private_embedder, private_optimizer, private_loader = engine.make_private(
            module=model.embedder,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
        )
    fixed = SupportSet(support.vectors.to(device), support.labels.to(device), support.indices)
    history = TrainHistory(num_examples=int(images.shape[0]))
    try:
        for epoch in range(config.epochs):
            started = time.perf_counter()
            losses = []
            model.train()
            for batch_images, batch_labels in private_loader:
                if augment is not None and batch_images.shape[0]:
                    batch_images = augment(batch_images, generator)
                batch_images = batch_images.to(device, non_blocking=on_gpu)
                batch_labels = batch_labels.to(device, non_blocking=on_gpu)
                logits = fixed_support_logits(model, batch_images, fixed, embedder=private_embedder)
                loss = sic_loss(logits, batch_labels)
                private_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                private_optimizer.step()
                if batch_images.shape[0]:
                    losses.append(loss.item())
            history.epochs.append(
                EpochRecord(
                    epoch=epoch + 1,
                    loss=sum(losses) / len(losses) if losses else math.nan,
                    lr=config.lr,
                    seconds=time.perf_counter() - started,
                )
            )
    finally:
        private_embedder._close()
    return history
