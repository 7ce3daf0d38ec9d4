"""Why are two images similar to the model? Property perturbations of SIC's exact similarity.

The method of Nauta et al. ("This Looks Like That, Because ... Explaining Prototypes for
Interpretable Image Recognition"), applied to SIC: the similarity of a case ``x`` and a
support sample ``s`` is the exact, differentiable B-cos kernel of their embeddings,
``sim(x, s) = |cos(f(x), f(s))| * (f(s)/||f(s)||) . f(x)`` (the support's evidence is
``sim / T``). For each visual property ``p`` a monotone perturbation ``P_p`` of fixed
strength is applied, in both of its directions, to the case (against the unchanged support)
and to the support (against the unchanged case)::

    drop_p      = sim(x, s) - mean over {case, support} x {+, -} of sim(perturbed pair)
    influence_p = drop_p / sum_q |drop_q|            (signed; |influence| sums to 1)

``influence_p > 0``: changing the property makes the two images less alike, so the
similarity rests on it; ``< 0``: changing it makes them more alike. The properties and their
fixed strengths (images of side ``S``):

- ``intensity``: gamma ``x ** 1.5`` and ``x ** (1 / 1.5)`` (darker / brighter);
- ``contrast``: ``mean + k (x - mean)`` with ``k = 1.5`` and ``1 / 1.5``, clipped to [0, 1];
- ``texture``: Gaussian blur (sigma ``S / 64``) against unsharp-mask sharpening (amount 1);
- ``shape``: an elastic deformation, a smooth random displacement field (fixed seed) of
  largest length ``S / 32``, applied forwards and backwards;
- ``position``: the window of side ``S / 4`` around the pixel that contributes most to this
  pair's similarity (the image's contribution map in explanation mode) is moved by
  ``S / 16`` pixels diagonally, either way, its old place filled from its surroundings.

The global version of a support (:func:`support_profiles`) is the mean influence over the
pairs it is in (e.g. every audit case against it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sic_core.explanations import explanation_mode
from sic_core.head import NORM_EPS
from sic_core.metrics.perturbation import blur, inpaint
from sic_core.model import SICModel, check_unit_interval

__all__ = [
    "PROPERTIES",
    "WhySimilar",
    "perturb",
    "support_profiles",
    "why_line",
    "why_similar",
]

PROPERTIES: tuple[str, ...] = ("intensity", "contrast", "texture", "shape", "position")
GAMMA = 1.5
CONTRAST = 1.5
SHARPEN = 1.0
DEFORMATION_SEED = 0


@dataclass(frozen=True)
class WhySimilar:
    """Property influences of a batch of (case, support) pairs.

    Attributes
    ----------
    similarity
        ``(P,)`` ``sim(x, s)`` of each pair, unperturbed.
    drop
        ``(P, 5)`` ``drop_p`` per pair and property (order :data:`PROPERTIES`).
    influence
        ``(P, 5)`` ``drop_p / sum_q |drop_q|`` (0 where nothing changes).
    """

    similarity: Tensor
    drop: Tensor
    influence: Tensor

    def as_dict(self, pair: int) -> dict[str, float]:
        """``{property: influence}`` of one pair."""
        return {p: float(v) for p, v in zip(PROPERTIES, self.influence[pair], strict=True)}


def _gamma(x: Tensor, exponent: float) -> Tensor:
    return x.clamp_min(0).pow(exponent)


def _contrast(x: Tensor, factor: float) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + factor * (x - mean)).clamp(0, 1)


def _texture(x: Tensor, sharpen: bool) -> Tensor:
    blurred = blur(x, max(x.shape[-1] / 64, 0.5))
    return (x + SHARPEN * (x - blurred)).clamp(0, 1) if sharpen else blurred


def _displacement(size: int, device: torch.device) -> Tensor:
    """A fixed smooth field ``(1, S, S, 2)`` in grid units, longest vector ``S / 32`` px."""
    generator = torch.Generator().manual_seed(DEFORMATION_SEED)
    coarse = torch.randn(1, 2, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)
    longest = field.norm(dim=1).max()
    pixels = field / longest * (size / 32)
    return (pixels * 2 / (size - 1)).permute(0, 2, 3, 1).to(device)


def _deform(x: Tensor, direction: float) -> Tensor:
    size = x.shape[-1]
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, size, device=x.device),
        torch.linspace(-1, 1, size, device=x.device),
        indexing="ij",
    )
    grid = torch.stack([xs, ys], dim=-1).unsqueeze(0) + direction * _displacement(size, x.device)
    warped = F.grid_sample(
        x, grid.expand(x.shape[0], -1, -1, -1), padding_mode="border", align_corners=True
    )
    return warped.clamp(0, 1)


def _move_window(x: Tensor, centres: Tensor, direction: int) -> Tensor:
    """Move each image's window around ``centres (B, 2)`` (row, col) by ``S / 16`` px."""
    size = x.shape[-1]
    half = max(size // 8, 1)
    step = direction * max(size // 16, 1)
    rows = torch.arange(size, device=x.device).view(1, -1, 1)
    cols = torch.arange(size, device=x.device).view(1, 1, -1)
    cy, cx = centres[:, 0].view(-1, 1, 1), centres[:, 1].view(-1, 1, 1)
    source = ((rows - cy).abs() <= half) & ((cols - cx).abs() <= half)
    target = ((rows - cy - step).abs() <= half) & ((cols - cx - step).abs() <= half)
    filled = inpaint(x, source.unsqueeze(1).to(x.dtype))
    moved = torch.roll(x, shifts=(step, step), dims=(2, 3))
    target = target.unsqueeze(1).to(x.dtype)
    return filled * (1 - target) + moved * target


def perturb(x: Tensor, prop: str, direction: int, centres: Tensor | None = None) -> Tensor:
    """Apply property ``prop``'s perturbation to images ``x (B, C, S, S)`` in [0, 1].

    ``direction`` is +1 or -1 (see the module docstring); ``centres (B, 2)`` (row, col) are
    required for ``position``.
    """
    if direction not in (1, -1):
        raise ValueError(f"direction: expected +1 or -1, got {direction}")
    if prop == "intensity":
        return _gamma(x, GAMMA**direction)
    if prop == "contrast":
        return _contrast(x, CONTRAST**direction)
    if prop == "texture":
        return _texture(x, sharpen=direction > 0)
    if prop == "shape":
        return _deform(x, float(direction))
    if prop == "position":
        if centres is None:
            raise ValueError("position: the strongest contribution's centres are required")
        return _move_window(x, centres, direction)
    raise ValueError(f"property: expected one of {', '.join(PROPERTIES)}, got {prop!r}")


@torch.no_grad()
def _embed(model: SICModel, images: Tensor, batch_size: int = 128) -> Tensor:
    return torch.cat([model.embed(chunk) for chunk in images.split(batch_size)])


def _strongest_pixels(
    model: SICModel, images: Tensor, partners: Tensor, batch_size: int = 64
) -> Tensor:
    """``(B, 2)`` (row, col) of the largest contribution to ``sim(f(images_i), partners_i)``."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    index = []
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        with explanation_mode(model), torch.enable_grad():
            for chunk, partner in zip(
                images.split(batch_size), partners.split(batch_size), strict=True
            ):
                encoded = model.encode(chunk).detach().requires_grad_(True)
                similarity = _paired_similarity(model.embedder(encoded), partner, detach_scale=True)
                (gradient,) = torch.autograd.grad(similarity.sum(), encoded)
                index.append((gradient * encoded).sum(dim=1).flatten(1).argmax(dim=1))
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
    flat = torch.cat(index)
    size = images.shape[-1]
    return torch.stack([flat // size, flat % size], dim=1)


def _paired_similarity(queries: Tensor, partners: Tensor, *, detach_scale: bool = False) -> Tensor:
    """``sim(q_i, s_i)`` row by row (the diagonal of :func:`bcos_similarity`)."""
    unit = partners / (partners.norm(dim=1, keepdim=True) + NORM_EPS)
    projection = (queries * unit).sum(dim=1)
    scale = projection.abs() / (queries.norm(dim=1) + NORM_EPS)
    if detach_scale:
        scale = scale.detach()
    return scale * projection


def why_similar(model: SICModel, cases: Tensor, supports: Tensor, pairs: Tensor) -> WhySimilar:
    """Property influences on the similarity of each (case, support) pair.

    Parameters
    ----------
    model
        The model whose similarity is explained (evaluation mode is used; the model's own
        support vectors are not: each pair's support is the embedding of its image).
    cases
        ``(N, C, S, S)`` case images in [0, 1].
    supports
        ``(M, C, S, S)`` support sample images in [0, 1].
    pairs
        ``(P, 2)`` int64 ``(case index, support index)`` per pair.

    Returns
    -------
    WhySimilar
        Similarities, drops and normalised influences per pair.
    """
    check_unit_interval(cases, name="cases")
    check_unit_interval(supports, name="supports")
    pairs = pairs.long().to(cases.device)
    case_index, support_index = pairs[:, 0], pairs[:, 1]
    was_training = model.training
    model.eval()
    try:
        case_embeddings = _embed(model, cases)
        support_embeddings = _embed(model, supports)
        q, s = case_embeddings[case_index], support_embeddings[support_index]
        base = _paired_similarity(q, s)
        case_centres = _strongest_pixels(model, cases[case_index], s)
        support_centres = _strongest_pixels(model, supports[support_index], q)
        drops = []
        for prop in PROPERTIES:
            perturbed = []
            for direction in (1, -1):
                if prop == "position":
                    moved_q = _embed(
                        model, perturb(cases[case_index], prop, direction, case_centres)
                    )
                    moved_s = _embed(
                        model, perturb(supports[support_index], prop, direction, support_centres)
                    )
                else:
                    moved_q = _embed(model, perturb(cases, prop, direction))[case_index]
                    moved_s = _embed(model, perturb(supports, prop, direction))[support_index]
                perturbed.append(_paired_similarity(moved_q, s))
                perturbed.append(_paired_similarity(q, moved_s))
            drops.append(base - torch.stack(perturbed).mean(dim=0))
    finally:
        model.train(was_training)
    drop = torch.stack(drops, dim=1).detach().cpu()
    total = drop.abs().sum(dim=1, keepdim=True)
    influence = torch.where(total > 0, drop / total.clamp_min(1e-30), torch.zeros_like(drop))
    return WhySimilar(similarity=base.detach().cpu(), drop=drop, influence=influence)


def support_profiles(result: WhySimilar, support_index: Tensor, num_supports: int) -> Tensor:
    """Mean influence per support ``(num_supports, 5)`` over the pairs it is in (``nan``: none)."""
    support_index = support_index.long().cpu()
    profiles = torch.full((num_supports, len(PROPERTIES)), float("nan"))
    for k in range(num_supports):
        mine = support_index == k
        if mine.any():
            profiles[k] = result.influence[mine].mean(dim=0)
    return profiles


def why_line(influence: Sequence[float]) -> str:
    """One line for a report: the two properties the similarity rests on most.

    ``"similar mainly through contrast (0.46) and texture (0.31)"``; a property whose change
    makes the pair *more* alike (negative influence) is never named as a reason.
    """
    ranked = sorted(
        ((v, p) for p, v in zip(PROPERTIES, influence, strict=True) if v > 0), reverse=True
    )
    if not ranked:
        return "no tested property carries this similarity"
    named = [f"{p} ({v:.2f})" for v, p in ranked[:2]]
    return "similar mainly through " + " and ".join(named)
