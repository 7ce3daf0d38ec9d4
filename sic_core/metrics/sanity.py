"""The milestone sanity suite (METRICS.md): checks that maps depend on the model and the data.

Run before a model is promoted, not every round (each check re-explains, and data
randomisation trains a model):

- :func:`cascading_randomisation` (Adebayo et al., "Sanity Checks for Saliency Maps", 2018):
  re-initialise the encoder layer by layer from the output side; maps must change. SIC's
  support vectors are embeddings of real support images, so they are re-embedded after every
  step (keeping the old vectors would compare the randomised encoder to a stale head).
- :func:`data_randomisation` (same paper): train the architecture on shuffled labels; its maps
  must lose the lesion localisation of the real model.
- :func:`grid_pointing_game` (Böhle et al., B-cos networks): one positive image among
  negatives in a ``grid x grid`` mosaic; the positive logit's evidence must sit in its tile.
- The counterfactual shortcut test is
  :func:`sic_core.metrics.perturbation.marker_counterfactual_shift`.

Notation as in :mod:`sic_core.metrics.maps`: ``R`` a ``(H, W)`` contribution map of the
explained class, ``R+ = max(R, 0)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sic_core.explanations import explain
from sic_core.metrics.maps import mass_lift, spearman
from sic_core.metrics.perturbation import MapExplainer
from sic_core.model import ModelConfig, SICModel
from sic_core.support import embed_all

__all__ = [
    "DataRandomisationResult",
    "GridPointingResult",
    "cascade_rank_correlations",
    "cascading_randomisation",
    "data_randomisation",
    "grid_pointing_game",
    "grid_tile_scores",
    "parameter_layers",
    "randomisation_layers",
]

_CHUNK = 64


def _device(model: SICModel) -> torch.device:
    return model.support_vectors.device


def _class_maps(model: SICModel, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Target-class maps ``(B, H, W)`` and predictions ``(B,)`` on CPU, in bounded chunks."""
    if x.shape[0] == 0:
        return torch.zeros(0, *x.shape[2:]), torch.zeros(0, dtype=torch.long)
    maps, predicted = [], []
    device = _device(model)
    for images, classes in zip(x.split(_CHUNK), target.split(_CHUNK), strict=True):
        result = explain(model, images.to(device), target=classes.to(device), per_support=False)
        maps.append(result.target_maps())
        predicted.append(result.predicted)
    return torch.cat(maps), torch.cat(predicted)


@torch.no_grad()
def _predict(model: SICModel, x: Tensor) -> Tensor:
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        return torch.cat(
            [model(images.to(device)).argmax(dim=1).cpu() for images in x.split(_CHUNK)]
        )
    finally:
        model.train(was_training)


def _fresh_model(config: ModelConfig, seed: int) -> SICModel:
    """A newly initialised model of ``config``'s architecture, seeded, without weight files.

    A pretrained ``weights`` file in the encoder config is dropped: "random" must mean the
    architecture's own initialisation. The global RNG is forked so callers' draws are kept.
    """
    cfg = {k: v for k, v in config.encoder_cfg.items() if k != "weights"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SICModel(replace(config, encoder_cfg=cfg))


def parameter_layers(module: nn.Module) -> list[tuple[str, list[str]]]:
    """``module``'s layers in forward order, each with the module names it owns.

    A layer is a module holding a weight matrix or filter bank (a parameter of dimension
    >= 2) together with the modules after it that hold only per-channel parameters (a
    norm's scale and shift). Names are relative to ``module``: the common prefix of the
    layer's modules, e.g. ``encoder.layers.4`` (convolution + norm) or ``projection``.
    """
    groups: list[list[str]] = []
    for name, child in module.named_modules():
        own = list(child.parameters(recurse=False))
        if not own:
            continue
        if any(p.dim() >= 2 for p in own) or not groups:
            groups.append([name])
        else:
            groups[-1].append(name)
    layers = []
    for members in groups:
        parts = [m.split(".") for m in members]
        common: list[str] = []
        for pieces in zip(*parts, strict=False):
            if len(set(pieces)) != 1:
                break
            common.append(pieces[0])
        if len(members) == 1 and common and common[-1] == "linear":
            common = common[:-1]  # the bcos modules keep their weights in an inner `.linear`
        layers.append((".".join(common) or members[0], members))
    return layers


def randomisation_layers(model: SICModel) -> list[tuple[str, list[str]]]:
    """The embedder's layers in forward order (:func:`parameter_layers` of ``model.embedder``)."""
    return parameter_layers(model.embedder)


def cascade_rank_correlations(
    model: nn.Module,
    images: Tensor,
    target: Tensor,
    explainer: MapExplainer,
    *,
    fresh: nn.Module,
    layers: list[tuple[str, list[str]]],
    refresh: Callable[[nn.Module], None] | None = None,
) -> list[tuple[str, float]]:
    """Cascading parameter randomisation of any model and explainer, output side first.

    ``layers`` name the modules of ``model`` per layer in forward order (e.g.
    :func:`parameter_layers`). Step 0 (``"none"``) randomises nothing; step ``j`` copies the
    parameters and buffers (BatchNorm running statistics) of the top ``j`` layers from
    ``fresh`` (a newly initialised model of the same architecture), calls ``refresh`` on the
    randomised copy (SIC re-embeds its supports) and reports::

        rho_j = median_i Spearman(R^{t_i}_orig(x_i), R^{t_i}_rand_j(x_i))

    with ``R = explainer(model, x, t)``. ``model`` is deep-copied, never modified.
    """
    original = explainer(model, images, target).cpu()
    randomised = copy.deepcopy(model)
    fresh_modules = dict(fresh.named_modules())
    own_modules = dict(randomised.named_modules())
    steps: list[tuple[str, list[str]]] = [("none", []), *reversed(layers)]
    result = []
    for layer, members in steps:
        with torch.no_grad():
            for name in members:
                own, new = own_modules[name], fresh_modules[name]
                for key, value in [
                    *own.named_parameters(recurse=False),
                    *own.named_buffers(recurse=False),
                ]:
                    value.copy_(getattr(new, key))
        if refresh is not None:
            refresh(randomised)
        maps = explainer(randomised, images, target).cpu()
        result.append((layer, float(spearman(original, maps).median())))
    return result


def cascading_randomisation(
    model: SICModel, images: Tensor, support_images: Tensor, *, seed: int = 0
) -> list[tuple[str, float]]:
    """Cascading model-parameter randomisation, output side first, supports re-embedded.

    Step 0 (``"none"``) randomises nothing and only re-embeds the supports: it is the control
    and gives 1 when the model's support vectors are the embeddings of ``support_images``.
    Step ``j`` re-initialises the top ``j`` layers of :func:`randomisation_layers` (cumulative,
    the architecture's own seeded initialisation), sets ``s_k = f_rand(x_k)`` for every
    support image ``x_k`` and reports::

        rho_j = median_i Spearman(R^{c_i}_orig(x_i), R^{c_i}_rand_j(x_i)),
        c_i   = argmax_c z_c(x_i) under the original model.

    Maps must change: ``rho`` falls well below 1 once layers are randomised (read it against
    two ordinary training seeds; B-cos maps keep some image structure at any weights).

    Parameters
    ----------
    model
        The model to check; it is deep-copied, never modified.
    images
        ``(B, C_in, H, W)`` float images in ``[0, 1]`` to explain.
    support_images
        ``(K, C_in, H, W)`` the image of each support vector, in the model's support order.

    Returns
    -------
    list[tuple[str, float]]
        ``(layer name, rho)`` per step: ``"none"`` then the layers from the output side down.
    """
    count = model.support_vectors.shape[0]
    if support_images.shape[0] != count:
        raise ValueError(
            f"support_images: expected {count} images (one per support vector), "
            f"got {support_images.shape[0]}"
        )
    labels = model.support_labels.detach().clone()
    predicted = _predict(model, images)

    def refresh(randomised: nn.Module) -> None:
        sic = cast(SICModel, randomised)
        sic.set_support(embed_all(sic, support_images), labels)

    def class_maps(explained: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        return _class_maps(cast(SICModel, explained), x, target)[0]

    fresh = _fresh_model(model.config, seed).to(_device(model))
    layers = [
        (name, [f"embedder.{member}" for member in members])
        for name, members in randomisation_layers(model)
    ]
    return cascade_rank_correlations(
        model, images, predicted, class_maps, fresh=fresh, layers=layers, refresh=refresh
    )


def grid_tile_scores(maps: Tensor, positive_tile: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Per mosaic: whether the tile with the most positive evidence is the positive tile.

    With tiles ``t`` of a ``grid x grid`` partition and ``m_t = sum_{p in t} R+_p``::

        hit   = [argmax_t m_t == t_pos]
        share = m_{t_pos} / sum_t m_t          (NaN without positive evidence)

    Parameters
    ----------
    maps
        ``(T, H, W)`` maps of the positive class; ``H`` and ``W`` divisible by ``grid``.
    positive_tile
        ``(T,)`` row-major index of the positive tile in ``[0, grid**2)``.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``hits (T,)`` bool and ``shares (T,)`` float.
    """
    trials, height, width = maps.shape
    if height % grid or width % grid:
        raise ValueError(f"maps: size {height}x{width} is not divisible by grid {grid}")
    mass = maps.clamp_min(0).reshape(trials, grid, height // grid, grid, width // grid)
    per_tile = mass.sum(dim=(2, 4)).flatten(1)
    total = per_tile.sum(dim=1)
    positive = positive_tile.long().view(-1, 1)
    share = per_tile.gather(1, positive).squeeze(1) / total.clamp_min(1e-12)
    share = torch.where(total > 0, share, torch.full_like(share, math.nan))
    hits = (per_tile.argmax(dim=1) == positive.squeeze(1)) & (total > 0)
    return hits, share


@dataclass(frozen=True)
class GridPointingResult:
    """Outcome of :func:`grid_pointing_game`.

    Attributes
    ----------
    hit_rate
        Share of mosaics whose top tile (most positive evidence) is the positive tile.
    positive_share
        Mean share of positive evidence inside the positive tile.
    chance
        ``1 / grid**2``: the hit rate (and share) of evidence spread at random.
    trials
        Number of mosaics.
    """

    hit_rate: float
    positive_share: float
    chance: float
    trials: int


def _mosaics(
    images: Tensor, positives: Tensor, negatives: Tensor, grid: int, trials: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``trials`` mosaics of the original size and their positive tile indices."""
    _, channels, height, width = images.shape
    tiles = grid * grid
    generator = torch.Generator().manual_seed(seed)
    positive_tile = torch.randint(tiles, (trials,), generator=generator)
    chosen = torch.empty(trials, tiles, dtype=torch.long)
    for t in range(trials):
        if negatives.numel() >= tiles - 1:
            picks = negatives[torch.randperm(negatives.numel(), generator=generator)[: tiles - 1]]
        else:
            picks = negatives[torch.randint(negatives.numel(), (tiles - 1,), generator=generator)]
        first = int(torch.randint(positives.numel(), (1,), generator=generator))
        row = picks.tolist()
        row.insert(int(positive_tile[t]), int(positives[first]))
        chosen[t] = torch.tensor(row)
    # Area averaging keeps every tile in [0, 1] and treats all tiles alike.
    small = F.interpolate(images, size=(height // grid, width // grid), mode="area")
    mosaic = small[chosen.flatten()].view(trials, grid, grid, channels, height // grid, -1)
    mosaic = mosaic.permute(0, 3, 1, 4, 2, 5).reshape(trials, channels, height, width)
    return mosaic.clamp(0, 1), positive_tile


def grid_pointing_game(
    model: SICModel,
    images: Tensor,
    labels: Tensor,
    *,
    positive_class: int = 1,
    grid: int = 2,
    trials: int = 64,
    correct_only: bool = True,
    seed: int = 0,
) -> GridPointingResult:
    """B-cos grid pointing game: does the positive class's evidence sit in the positive tile?

    Each mosaic downsamples ``grid**2`` images (area averaging) into the tiles of one image of
    the original size: one image of ``positive_class`` at a random tile, the others of class
    0. The map ``R`` of ``z_positive_class`` is scored by :func:`grid_tile_scores`;
    ``chance = 1 / grid**2``.

    Parameters
    ----------
    model
        The model to check (not modified).
    images
        ``(N, C_in, H, W)`` float images in ``[0, 1]``, ``H`` and ``W`` divisible by ``grid``.
    labels
        ``(N,)`` classes; needs at least one ``positive_class`` and one class-0 image.
    trials
        Number of mosaics (seeded).
    correct_only
        As in the B-cos paper, draw only images the model classifies correctly on their own
        (so the game measures localisation, not accuracy); falls back to all images of a
        class when the model gets none of them right.
    """
    if positive_class == 0:
        raise ValueError("positive_class: class 0 fills the negative tiles; choose another")
    if grid < 1 or trials < 1:
        raise ValueError(f"grid and trials: expected >= 1, got {grid} and {trials}")
    height, width = images.shape[2:]
    if height % grid or width % grid:
        raise ValueError(f"images: size {height}x{width} is not divisible by grid {grid}")
    labels = labels.cpu().long()
    images = images.cpu()
    correct = _predict(model, images) == labels
    if not correct_only:
        correct = torch.ones_like(correct)

    def members(c: int) -> Tensor:
        found = torch.nonzero(labels == c).flatten()
        right = found[correct[found]]
        return right if right.numel() else found

    positives, negatives = members(positive_class), members(0)
    if positives.numel() == 0 or negatives.numel() == 0:
        raise ValueError(
            f"labels: need images of class {positive_class} and of class 0, got "
            f"{positives.numel()} and {negatives.numel()}"
        )
    mosaic, positive_tile = _mosaics(images, positives, negatives, grid, trials, seed)
    maps, _ = _class_maps(model, mosaic, torch.full((trials,), positive_class))
    hits, shares = grid_tile_scores(maps, positive_tile, grid)
    finite = shares[torch.isfinite(shares)]
    return GridPointingResult(
        hit_rate=float(hits.float().mean()),
        positive_share=float(finite.mean()) if finite.numel() else math.nan,
        chance=1 / grid**2,
        trials=trials,
    )


@dataclass(frozen=True)
class DataRandomisationResult:
    """Outcome of :func:`data_randomisation`.

    Attributes
    ----------
    lift_trained, lift_shuffled
        Median relevance-mass lift on the lesion cases, of the given model and of the model
        trained on shuffled labels (NaN without cases).
    rank_correlation
        Median Spearman correlation of the two models' maps on those cases.
    shuffled_train_accuracy
        How well the shuffled model fits its shuffled training labels (memorisation).
    cases
        Lesion cases scored.
    """

    lift_trained: float
    lift_shuffled: float
    rank_correlation: float
    shuffled_train_accuracy: float
    cases: int


def _nanmedian(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.median()) if finite.numel() else math.nan


def data_randomisation(
    model: SICModel,
    train_images: Tensor,
    train_labels: Tensor,
    audit_images: Tensor,
    audit_labels: Tensor,
    lesion_masks: Tensor,
    *,
    epochs: int = 3,
    initial_state: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> DataRandomisationResult:
    """Data randomisation test: a model trained on shuffled labels must not localise lesions.

    A fresh model of ``model``'s architecture (seeded initialisation, or ``initial_state``,
    e.g. the federation's initial weights) is trained with :func:`sic_core.training.train_sic`
    on ``train_labels`` randomly permuted (class counts kept). Cases are the audit images of a
    finding class (label > 0) with a non-empty lesion mask that the given model classifies
    correctly; both models explain each case's true class ``c_i`` and::

        lift = median_i (sum_{p in M_i} R+_p / sum_p R+_p) / (|M_i| / HW)

    (:func:`sic_core.metrics.maps.mass_lift`). A faithful explainer gives
    ``lift_shuffled < lift_trained``.

    Parameters
    ----------
    model
        The trained model to check (not modified).
    train_images, train_labels
        ``(N, C_in, H, W)`` in ``[0, 1]`` and ``(N,)`` classes to train the shuffled model on.
    audit_images, audit_labels
        ``(B, C_in, H, W)`` and ``(B,)`` cases to explain.
    lesion_masks
        ``(B, H, W)`` binary lesion masks (all zero where unknown).
    epochs
        Training epochs of the shuffled model (the first up to two against anchor supports,
        as :class:`~sic_core.training.TrainConfig` does from scratch).
    """
    if lesion_masks.shape != (audit_images.shape[0], *audit_images.shape[2:]):
        raise ValueError(
            f"lesion_masks: expected shape {(audit_images.shape[0], *audit_images.shape[2:])}, "
            f"got {tuple(lesion_masks.shape)}"
        )
    # sic_core.training imports sic_core.metrics: importing it at module level is circular.
    from sic_core.training import TrainConfig, train_sic

    generator = torch.Generator().manual_seed(seed)
    train_labels = train_labels.cpu().long()
    shuffled_labels = train_labels[torch.randperm(train_labels.numel(), generator=generator)]
    shuffled = _fresh_model(model.config, seed).to(_device(model))
    if initial_state is not None:
        shuffled.load_state_dict(initial_state)
    config = TrainConfig(epochs=epochs, warmup_epochs=min(0.5, epochs), seed=seed)
    train_sic(shuffled, train_images, shuffled_labels, config)
    fit = float((_predict(shuffled, train_images) == shuffled_labels).float().mean())

    audit_labels = audit_labels.cpu().long()
    masks = lesion_masks.cpu().bool()
    cases = (audit_labels > 0) & masks.flatten(1).any(dim=1)
    cases &= _predict(model, audit_images) == audit_labels
    images, truth, masks = audit_images[cases], audit_labels[cases], masks[cases]
    trained_maps, _ = _class_maps(model, images, truth)
    shuffled_maps, _ = _class_maps(shuffled, images, truth)
    correlation = spearman(trained_maps, shuffled_maps) if truth.numel() else torch.zeros(0)
    return DataRandomisationResult(
        lift_trained=_nanmedian(mass_lift(trained_maps, masks)),
        lift_shuffled=_nanmedian(mass_lift(shuffled_maps, masks)),
        rank_correlation=_nanmedian(correlation),
        shuffled_train_accuracy=fit,
        cases=int(truth.numel()),
    )
