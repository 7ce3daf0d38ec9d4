"""Local SIC training on one site's tensors.

Non-DP mode is the reference's episodic scheme: every step draws a query batch and a support
batch of ``n_shot`` images per class from the training set, passes both through the encoder
in one forward (gradients flow through both), scores the queries against the support
embeddings and minimises BCE on one-hot targets with AdamW.

Fixed-support mode (used under DP-SGD) scores the queries against given support vectors held
fixed, so each query's loss depends only on its own image and public values.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sic_core.errors import ConfigError
from sic_core.head import sic_loss
from sic_core.metrics import auroc
from sic_core.model import SICModel, check_unit_interval
from sic_core.support import SupportSet, anchor_support, embed_all, select_support

__all__ = [
    "EpochRecord",
    "TrainConfig",
    "TrainHistory",
    "episodic_logits",
    "fixed_support_logits",
    "learning_rate_factor",
    "sample_support_indices",
    "train_sic",
]

log = logging.getLogger(__name__)

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings; defaults are the reference SIC's.

    Attributes
    ----------
    epochs
        Passes over the training set.
    lr, weight_decay
        AdamW settings.
    warmup_epochs, warmup_start_lr
        Linear warm-up from ``warmup_start_lr`` to ``lr``; then constant until 50 % of
        training, then halved every further 10 %.
    anchor_epochs
        Leading epochs trained against fixed, class-disjoint anchor supports
        (:func:`sic_core.support.anchor_support`) when training from scratch; ignored when
        ``fixed_support`` is given. 0 disables it (e.g. for a pretrained encoder).
    batch_size
        Query images per step.
    n_way
        Classes per episode's support batch (``None``: every class).
    seed
        Seeds batch order, support draws and the final k-means.
    """

    epochs: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_epochs: float = 2.0
    warmup_start_lr: float = 1e-4
    anchor_epochs: int = 2
    batch_size: int = 32
    n_way: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs: expected >= 0, got {self.epochs}")
        if self.anchor_epochs < 0:
            raise ConfigError(f"anchor_epochs: expected >= 0, got {self.anchor_epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected > 0, got {self.lr}")
        if self.n_way is not None and self.n_way < 1:
            raise ConfigError(f"n_way: expected >= 1 or None, got {self.n_way}")


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did: mean loss, last learning rate, seconds, optional validation AUROC."""

    epoch: int
    loss: float
    lr: float
    seconds: float
    val_auroc: float | None = None


@dataclass
class TrainHistory:
    """Per-epoch records plus the number of training images seen per epoch."""

    num_examples: int
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss if self.epochs else math.nan

    def to_dict(self) -> dict[str, object]:
        return {"num_examples": self.num_examples, "epochs": [asdict(e) for e in self.epochs]}


def learning_rate_factor(progress: float, *, total_epochs: float, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` after ``progress`` epochs (fractional) of ``total_epochs``."""
    if progress < config.warmup_epochs:
        start = config.warmup_start_lr / config.lr
        return start + (1 - start) * progress / config.warmup_epochs
    fraction = progress / max(total_epochs, 1e-12)
    if fraction < 0.5:
        return 1.0
    return 0.5 ** math.floor((fraction - 0.5) / 0.1 + 1e-9)


def sample_support_indices(
    labels: Tensor,
    n_shot: int,
    classes: list[int],
    generator: torch.Generator,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``n_shot`` training indices per class (class order) for one episode.

    Images in ``exclude`` (the query batch) are avoided when the class has enough others;
    a class with fewer than ``n_shot`` images is drawn with replacement; an absent class is
    skipped (it then has no supports in this episode).

    Returns
    -------
    tuple[Tensor, Tensor]
        ``indices (K',)`` and their ``labels (K',)``.
    """
    excluded = torch.zeros(labels.shape[0], dtype=torch.bool)
    if exclude is not None:
        excluded[exclude] = True
    chosen: list[Tensor] = []
    chosen_labels: list[Tensor] = []
    for c in classes:
        members = torch.nonzero(labels == c).flatten()
        if members.numel() == 0:
            continue
        preferred = members[~excluded[members]]
        pool = preferred if preferred.numel() >= n_shot else members
        if pool.numel() >= n_shot:
            pick = pool[torch.randperm(pool.numel(), generator=generator)[:n_shot]]
        else:
            pick = pool[torch.randint(pool.numel(), (n_shot,), generator=generator)]
        chosen.append(pick)
        chosen_labels.append(torch.full((n_shot,), c, dtype=torch.long))
    return torch.cat(chosen), torch.cat(chosen_labels)


def episodic_logits(
    model: SICModel, queries: Tensor, supports: Tensor, support_labels: Tensor
) -> Tensor:
    """Logits ``(B, C)`` of query images against support images, through one encoder pass."""
    embeddings = model.embed(torch.cat([queries, supports]))
    query_embeddings, support_embeddings = embeddings.split([queries.shape[0], supports.shape[0]])
    return model.logits_from_embeddings(query_embeddings, support_embeddings, support_labels)


def fixed_support_logits(
    model: SICModel,
    queries: Tensor,
    support: SupportSet,
    embedder: nn.Module | None = None,
) -> Tensor:
    """Logits ``(B, C)`` against fixed support vectors; each row depends on one image only.

    ``embedder`` replaces ``model.embedder`` (e.g. an Opacus ``GradSampleModule`` around it).
    """
    embed = model.embedder if embedder is None else embedder
    query_embeddings = embed(model.encode(queries))
    return model.logits_from_embeddings(query_embeddings, support.vectors, support.labels)


def _episode_classes(
    batch_labels: Tensor, num_classes: int, n_way: int | None, generator: torch.Generator
) -> list[int]:
    if n_way is None or n_way >= num_classes:
        return list(range(num_classes))
    present = batch_labels.unique().tolist()[:n_way]
    others = [
        c for c in torch.randperm(num_classes, generator=generator).tolist() if c not in present
    ]
    return sorted(present + others[: n_way - len(present)])


def train_sic(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    progress: bool = False,
    fixed_support: SupportSet | None = None,
    augment: Augment | None = None,
    val_images: Tensor | None = None,
    val_labels: Tensor | None = None,
    finalize_support: bool = True,
) -> TrainHistory:
    """Train ``model`` on one site's tensors.

    Parameters
    ----------
    model
        The model to train in place (on its current device).
    images
        ``(N, C_in, H, W)`` float32 training images in ``[0, 1]`` (CPU or device).
    labels
        ``(N,)`` int64 classes.
    config
        Optimiser, schedule and episode settings.
    progress
        Show a progress bar.
    fixed_support
        Train every epoch against these fixed support vectors (DP mode) instead of
        episodic support images.
    augment
        ``augment(batch, generator) -> batch``, applied to query images only.
    val_images, val_labels
        Optional validation split; its AUROC is recorded each epoch (supports recomputed
        by k-means on the training embeddings, as the reference does).
    finalize_support
        Select the site-local support set on the training embeddings at the end.

    Returns
    -------
    TrainHistory
        Per-epoch loss, learning rate, time and validation AUROC.
    """
    check_unit_interval(images, name="images")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels: expected shape ({images.shape[0]},), got {tuple(labels.shape)}")
    device = model.support_vectors.device
    labels = labels.long()
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = max(1, math.ceil(images.shape[0] / config.batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate_factor(
            step / steps_per_epoch, total_epochs=config.epochs, config=config
        ),
    )
    history = TrainHistory(num_examples=int(images.shape[0]))
    anchors = anchor_support(
        model.num_classes, model.n_shot, model.config.proj_dim, seed=config.seed
    )
    bar = tqdm(total=config.epochs * steps_per_epoch, disable=not progress, desc="SIC training")
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        losses = []
        epoch_support = fixed_support
        if epoch_support is None and epoch < config.anchor_epochs:
            epoch_support = anchors
        if epoch_support is not None:
            epoch_support = SupportSet(
                epoch_support.vectors.to(device),
                epoch_support.labels.to(device),
                epoch_support.indices,
            )
        for batch_index in torch.randperm(images.shape[0], generator=generator).split(
            config.batch_size
        ):
            queries = images[batch_index]
            if augment is not None:
                queries = augment(queries, generator)
            queries, targets = queries.to(device), labels[batch_index].to(device)
            if epoch_support is None:
                classes = _episode_classes(
                    targets.cpu(), model.num_classes, config.n_way, generator
                )
                support_index, support_labels = sample_support_indices(
                    labels, model.n_shot, classes, generator, exclude=batch_index
                )
                logits = episodic_logits(
                    model, queries, images[support_index].to(device), support_labels.to(device)
                )
            else:
                logits = fixed_support_logits(model, queries, epoch_support)
            loss = sic_loss(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
        val_auroc = None
        if val_images is not None and val_labels is not None:
            val_auroc = _validation_auroc(model, images, labels, val_images, val_labels, config)
        record = EpochRecord(
            epoch=epoch + 1,
            loss=sum(losses) / len(losses),
            lr=scheduler.get_last_lr()[0],
            seconds=time.perf_counter() - started,
            val_auroc=val_auroc,
        )
        history.epochs.append(record)
        log.info("epoch %d: loss %.4f val_auroc %s", record.epoch, record.loss, val_auroc)
    bar.close()
    if finalize_support:
        support = select_support(
            embed_all(model, images), labels, model.num_classes, model.n_shot, seed=config.seed
        )
        model.set_support(support.vectors, support.labels)
    return history


def _validation_auroc(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    val_images: Tensor,
    val_labels: Tensor,
    config: TrainConfig,
) -> float:
    support = select_support(
        embed_all(model, images), labels, model.num_classes, model.n_shot, seed=config.seed
    )
    model.set_support(support.vectors, support.labels)
    device = model.support_vectors.device
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(chunk.to(device)).cpu() for chunk in val_images.split(256)])
    return auroc(logits, val_labels)
