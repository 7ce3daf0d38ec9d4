"""Local SIC training on one site's tensors.

Non-DP mode is the reference's episodic scheme: every step draws a query batch and a support
batch of ``n_shot`` images per class from the training set, passes both through the encoder
in one forward (gradients flow through both), scores the queries against the support
embeddings and minimises BCE on one-hot targets with AdamW.

From scratch that scheme has a trap (measured on SynthCXR easy, 64 px, site A: 4 of 5
seeds fell into it when episodic training started after two fixed anchor epochs). If every
embedding is the same vector ``q``, both logits equal ``n_shot ||q|| / T + b``; BCE is
lowest at logit 0, the loss is ln 2, and the kernel ``||q|| cos^2`` has no slope in angle,
so nothing pulls the classes apart again: a fixed point. Two changes remove it:

- **A class-anchored term.** Every episodic step adds ``anchor_weight`` times the BCE of
  the queries against fixed, class-disjoint public anchors
  (:func:`sic_core.support.anchor_support`). That term is first-order in the direction
  that separates the classes, so the collapsed state is not a fixed point of the sum.
- **A measured switch.** An epoch trains episodically only when, at its start, the anchor
  logits of a fixed training subset separate the classes (AUROC >= ``switch_auroc``, with
  a mean pairwise embedding cosine of at most 0.99); otherwise it trains against the
  anchors alone. The same check runs before every epoch,
  so a model that loses separation (or starts collapsed, e.g. a poor global model in a
  federated round) goes back to anchored epochs until it recovers.

:attr:`TrainHistory.collapsed` reports the trap itself: final loss within 1e-3 of ln 2 and
embeddings with mean pairwise cosine above 0.99.

Fixed-support mode (used under DP-SGD) scores the queries against given support vectors held
fixed, so each query's loss depends only on its own image and public values.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sic_core.errors import ConfigError
from sic_core.head import sic_loss
from sic_core.metrics import auroc
from sic_core.model import SICModel, check_unit_interval
from sic_core.support import SupportSet, anchor_support, embed_all, select_support

__all__ = [
    "EpochRecord",
    "Phase",
    "Separation",
    "TrainConfig",
    "TrainHistory",
    "embedding_separation",
    "episodic_logits",
    "fixed_support_logits",
    "learning_rate_factor",
    "sample_support_indices",
    "train_sic",
]

log = logging.getLogger(__name__)

Augment = Callable[[Tensor, torch.Generator], Tensor]
#: What an epoch's supports were: the public anchors alone, episodic support images (plus
#: the anchored term), or given fixed supports (DP mode).
Phase = Literal["anchored", "episodic", "fixed"]

#: Training images embedded before every epoch to measure separation and collapse.
SEPARATION_SAMPLE = 256
#: Collapse: final loss within this distance of ln 2 ...
COLLAPSE_LOSS_TOLERANCE = 1e-3
#: ... with embeddings whose mean pairwise cosine exceeds this.
COLLAPSE_COSINE = 0.99


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings.

    The defaults are the reference SIC's except three, measured from scratch on SynthCXR
    ``default`` at 64 px from site A (README, "How SIC learns from scratch"): ``lr`` 5e-4
    instead of 1e-3 (at 1e-3 some seeds sat at loss ln 2 for 6-12 epochs; at 7e-4 one
    still did), no step decay (a 12-epoch budget halved the rate from epoch 6 on, before the
    encoder had found the lesion), and ``switch_auroc`` 0.97 instead of 0.9 (switching to
    episodic supports at a training-subset AUROC of 0.9, while validation stood near 0.8,
    was followed by falls of 0.14-0.36 in validation AUROC in 3 of 8 runs).

    Attributes
    ----------
    epochs
        Passes over the training set.
    lr, weight_decay
        AdamW settings.
    warmup_epochs, warmup_start_lr
        Linear warm-up from ``warmup_start_lr`` to ``lr``; then constant.
    decay_after
        Fraction of training after which the learning rate halves every further 10 % (the
        reference's schedule: 0.5); ``None`` keeps it constant after the warm-up.
    switch_auroc
        An epoch uses episodic supports only when the anchor logits of a training subset
        reach this AUROC at its start (the embedding separates the classes); before that,
        and whenever separation is lost again, it trains against the public anchors alone.
        ``None``: anchors every epoch. 0: episodic from the first epoch (a pretrained
        encoder) unless the embeddings are collapsed (mean pairwise cosine above 0.99).
        Ignored when ``fixed_support`` is given.
    anchor_weight
        Weight of the class-anchored BCE term added to every episodic step (0: the
        reference's pure episodic loss, which can collapse from scratch).
    batch_size
        Query images per step.
    n_way
        Classes per episode's support batch (``None``: every class).
    seed
        Seeds batch order, support draws and the final k-means.
    """

    epochs: int = 50
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_epochs: float = 2.0
    warmup_start_lr: float = 1e-4
    decay_after: float | None = None
    switch_auroc: float | None = 0.97
    anchor_weight: float = 1.0
    batch_size: int = 32
    n_way: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ConfigError(f"epochs: expected >= 0, got {self.epochs}")
        if self.switch_auroc is not None and not 0 <= self.switch_auroc <= 1:
            raise ConfigError(f"switch_auroc: expected None or 0..1, got {self.switch_auroc}")
        if not self.anchor_weight >= 0:
            raise ConfigError(f"anchor_weight: expected >= 0, got {self.anchor_weight}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr: expected > 0, got {self.lr}")
        if self.decay_after is not None and not 0 <= self.decay_after <= 1:
            raise ConfigError(f"decay_after: expected None or 0..1, got {self.decay_after}")
        if self.n_way is not None and self.n_way < 1:
            raise ConfigError(f"n_way: expected >= 1 or None, got {self.n_way}")


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch did.

    Attributes
    ----------
    phase
        Which supports it trained against (:data:`Phase`).
    separation
        AUROC of the anchor logits on the training subset at the epoch's start (``nan``
        when the subset holds one class only, or in fixed-support mode).
    """

    epoch: int
    loss: float
    lr: float
    seconds: float
    val_auroc: float | None = None
    phase: Phase = "anchored"
    separation: float = math.nan


@dataclass(frozen=True)
class Separation:
    """How far a training subset's embeddings are apart.

    Attributes
    ----------
    anchor_auroc
        AUROC of the subset's logits against the public anchors (``nan``: one class only).
    mean_cosine
        Mean pairwise cosine of the embeddings (1: every embedding points the same way).
    """

    anchor_auroc: float
    mean_cosine: float


@dataclass
class TrainHistory:
    """Per-epoch records, the number of training images, and the final embedding spread."""

    num_examples: int
    epochs: list[EpochRecord] = field(default_factory=list)
    final_mean_cosine: float = math.nan

    @property
    def final_loss(self) -> float:
        return self.epochs[-1].loss if self.epochs else math.nan

    @property
    def collapsed(self) -> bool:
        """The episodic fixed point: loss at ln 2 and (nearly) identical embeddings."""
        return (
            abs(self.final_loss - math.log(2)) <= COLLAPSE_LOSS_TOLERANCE
            and self.final_mean_cosine > COLLAPSE_COSINE
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "num_examples": self.num_examples,
            "epochs": [asdict(e) for e in self.epochs],
            "final_mean_cosine": self.final_mean_cosine,
            "collapsed": self.collapsed,
        }


def learning_rate_factor(progress: float, *, total_epochs: float, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` after ``progress`` epochs (fractional) of ``total_epochs``."""
    if progress < config.warmup_epochs:
        start = config.warmup_start_lr / config.lr
        return start + (1 - start) * progress / config.warmup_epochs
    fraction = progress / max(total_epochs, 1e-12)
    if config.decay_after is None or fraction < config.decay_after:
        return 1.0
    return 0.5 ** math.floor((fraction - config.decay_after) / 0.1 + 1e-9)


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


def _embed_episode(model: SICModel, queries: Tensor, supports: Tensor) -> tuple[Tensor, Tensor]:
    """Query and support embeddings through one encoder pass (gradients flow through both)."""
    embeddings = model.embed(torch.cat([queries, supports]))
    query_embeddings, support_embeddings = embeddings.split([queries.shape[0], supports.shape[0]])
    return query_embeddings, support_embeddings


def episodic_logits(
    model: SICModel, queries: Tensor, supports: Tensor, support_labels: Tensor
) -> Tensor:
    """Logits ``(B, C)`` of query images against support images, through one encoder pass."""
    query_embeddings, support_embeddings = _embed_episode(model, queries, supports)
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


@torch.no_grad()
def embedding_separation(
    model: SICModel, images: Tensor, labels: Tensor, anchors: SupportSet
) -> Separation:
    """Measure how well the embeddings of ``images`` separate the classes.

    Parameters
    ----------
    model
        The model (its mode is restored afterwards).
    images
        ``(N, C_in, H, W)`` float32 in ``[0, 1]``, a training subset.
    labels
        ``(N,)`` int64 classes.
    anchors
        The public class anchors the separation is read against.
    """
    embeddings = embed_all(model, images)
    device = model.support_vectors.device
    logits = model.logits_from_embeddings(
        embeddings.to(device), anchors.vectors.to(device), anchors.labels.to(device)
    ).cpu()
    unit = F.normalize(embeddings, dim=1, eps=1e-12)
    n = unit.shape[0]
    cosine = ((unit.sum(0).square().sum() - n) / max(n * (n - 1), 1)).item() if n > 1 else 1.0
    return Separation(anchor_auroc=auroc(logits, labels), mean_cosine=float(cosine))


def _separation_subset(images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(images.shape[0], generator=generator)[:SEPARATION_SAMPLE]
    return images[chosen], labels[chosen]


def _epoch_phase(config: TrainConfig, separation: Separation) -> Phase:
    if config.switch_auroc is None:
        return "anchored"
    # Nearly identical embeddings can still rank the classes by tiny differences in
    # direction, so a collapsed subset never counts as separated; nor does nan (one class).
    separated = (
        separation.anchor_auroc >= config.switch_auroc and separation.mean_cosine <= COLLAPSE_COSINE
    )
    return "episodic" if separated else "anchored"


def _on_device(support: SupportSet, device: torch.device) -> SupportSet:
    return SupportSet(support.vectors.to(device), support.labels.to(device), support.indices)


def train_sic(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    config: TrainConfig,
    *,
    progress: bool = False,
    fixed_support: SupportSet | None = None,
    anchors: SupportSet | None = None,
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
        Optimiser, schedule, switch and episode settings.
    progress
        Show a progress bar.
    fixed_support
        Train every epoch against these fixed support vectors (DP mode) instead of
        episodic support images.
    anchors
        The public class anchors of the anchored epochs and the anchored term (default:
        :func:`sic_core.support.anchor_support` seeded with ``config.seed``; a federation
        passes the run's anchors so that every site and round trains toward the same ones).
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
        Per-epoch loss, phase, separation, learning rate, time and validation AUROC, and
        whether training ended collapsed.
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
    if anchors is None:
        anchors = anchor_support(
            model.num_classes, model.n_shot, model.config.proj_dim, seed=config.seed
        )
    anchors = _on_device(anchors, device)
    subset_images, subset_labels = _separation_subset(images, labels, config.seed)
    bar = tqdm(total=config.epochs * steps_per_epoch, disable=not progress, desc="SIC training")
    for epoch in range(config.epochs):
        started = time.perf_counter()
        separation = Separation(anchor_auroc=math.nan, mean_cosine=math.nan)
        if fixed_support is not None:
            phase: Phase = "fixed"
            epoch_support = _on_device(fixed_support, device)
        else:
            separation = embedding_separation(model, subset_images, subset_labels, anchors)
            phase = _epoch_phase(config, separation)
            epoch_support = anchors
        model.train()
        losses = []
        for batch_index in torch.randperm(images.shape[0], generator=generator).split(
            config.batch_size
        ):
            queries = images[batch_index]
            if augment is not None:
                queries = augment(queries, generator)
            queries, targets = queries.to(device), labels[batch_index].to(device)
            if phase == "episodic":
                loss = _episodic_loss(
                    model,
                    queries,
                    targets,
                    images,
                    labels,
                    batch_index,
                    anchors,
                    config,
                    generator,
                )
            else:
                loss = sic_loss(fixed_support_logits(model, queries, epoch_support), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, phase=phase, loss=f"{loss.item():.4f}")
        val_auroc = None
        if val_images is not None and val_labels is not None:
            val_auroc = _validation_auroc(model, images, labels, val_images, val_labels, config)
        record = EpochRecord(
            epoch=epoch + 1,
            loss=sum(losses) / len(losses),
            lr=scheduler.get_last_lr()[0],
            seconds=time.perf_counter() - started,
            val_auroc=val_auroc,
            phase=phase,
            separation=separation.anchor_auroc,
        )
        history.epochs.append(record)
        log.info(
            "epoch %d (%s, separation %.3f): loss %.4f val_auroc %s",
            record.epoch,
            phase,
            record.separation,
            record.loss,
            val_auroc,
        )
    bar.close()
    history.final_mean_cosine = embedding_separation(
        model, subset_images, subset_labels, anchors
    ).mean_cosine
    if history.collapsed:
        log.warning(
            "training ended collapsed: loss %.4f (ln 2 = %.4f), mean embedding cosine %.3f",
            history.final_loss,
            math.log(2),
            history.final_mean_cosine,
        )
    if finalize_support:
        support = select_support(
            embed_all(model, images), labels, model.num_classes, model.n_shot, seed=config.seed
        )
        model.set_support(support.vectors, support.labels)
    return history


def _episodic_loss(
    model: SICModel,
    queries: Tensor,
    targets: Tensor,
    images: Tensor,
    labels: Tensor,
    batch_index: Tensor,
    anchors: SupportSet,
    config: TrainConfig,
    generator: torch.Generator,
) -> Tensor:
    """Episodic BCE of the queries against drawn support images, plus the anchored term.

    Both terms share one encoder pass over queries and supports.
    """
    device = queries.device
    classes = _episode_classes(targets.cpu(), model.num_classes, config.n_way, generator)
    support_index, support_labels = sample_support_indices(
        labels, model.n_shot, classes, generator, exclude=batch_index
    )
    query_embeddings, support_embeddings = _embed_episode(
        model, queries, images[support_index].to(device)
    )
    episodic = model.logits_from_embeddings(
        query_embeddings, support_embeddings, support_labels.to(device)
    )
    loss = sic_loss(episodic, targets)
    if config.anchor_weight > 0:
        anchored = model.logits_from_embeddings(query_embeddings, anchors.vectors, anchors.labels)
        loss = loss + config.anchor_weight * sic_loss(anchored, targets)
    return loss


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
