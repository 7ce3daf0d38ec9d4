"""95 % confidence intervals for reported figures, with the reports' small-cell rule.

- **AUROC** (binary): DeLong's interval, ``AUROC +- z * sqrt(V10 / m + V01 / n)`` from the
  structural components ``V10_i = mean_j psi(x_i, y_j)`` over the ``m`` positives and
  ``V01_j = mean_i psi(x_i, y_j)`` over the ``n`` negatives (``psi`` = 1, 1/2, 0 for a
  positive scored above, tied with, below a negative), clipped to ``[0, 1]``. Where the
  estimate is 0 or 1, DeLong's variance is 0 and the interval would claim certainty from a
  handful of cases; there the interval is Newcombe's (2006, method 5) score interval: the
  ``theta`` with ``|AUROC - theta| <= z * sqrt(V(theta))``,
  ``V(theta) = theta (1 - theta) / (m n) * [2N - 1 - (3N - 3) / ((2 - theta)(1 + theta))]``,
  ``N = (m + n) / 2``. Multi-class macro AUROC: the stratified bootstrap below.
- **Anything else** (balanced accuracy, ECE, explanation metrics over audit cases): a
  percentile bootstrap, resampling cases with replacement within each class (stratified, so
  every replicate keeps the class counts), :data:`BOOTSTRAP_REPLICATES` replicates from a
  fixed seed.

Small cells. A report hides a class count from 1 to 9 (it shows ``"<10"``), and an interval's
width is a function of the counts behind it (DeLong's of ``m`` and ``n``), so an interval over
cases with such a class could give the hidden count back. Every function here returns
``None`` instead when any class present has fewer than :data:`MIN_CELL` cases, or when fewer
than :data:`MIN_CELL` cases are scored at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sic_core.metrics.classification import auroc

__all__ = [
    "BOOTSTRAP_REPLICATES",
    "LEVEL",
    "MIN_CELL",
    "Interval",
    "auroc_interval",
    "bootstrap_interval",
    "format_interval",
    "has_small_cell",
    "mean_interval",
]

#: Below this many cases in a class (or in all), no interval is shown (the count rule).
MIN_CELL = 10
LEVEL = 0.95
BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 0
_Z = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A two-sided interval ``[low, high]`` and the method that produced it."""

    low: float
    high: float
    method: str

    def to_list(self) -> list[float]:
        return [self.low, self.high]


def has_small_cell(labels: Tensor) -> bool:
    """True if a class present in ``labels`` has 1..``MIN_CELL - 1`` cases (or all do)."""
    labels = labels.detach().long().cpu()
    if labels.numel() < MIN_CELL:
        return True
    counts = torch.bincount(labels)
    return bool(((counts > 0) & (counts < MIN_CELL)).any())


def format_interval(interval: Interval | None) -> str:
    """``"[0.912, 0.987]"``; ``"n<10"`` when the small-cell rule withheld it."""
    if interval is None:
        return f"n<{MIN_CELL}"
    return f"[{interval.low:.3g}, {interval.high:.3g}]"


def _psi(positive_scores: Tensor, negative_scores: Tensor) -> Tensor:
    difference = positive_scores[:, None] - negative_scores[None, :]
    return (difference > 0).double() + 0.5 * (difference == 0).double()


def _newcombe(estimate: float, m: int, n: int) -> tuple[float, float]:
    big_n = (m + n) / 2

    def gap(theta: float) -> float:
        variance = (
            theta
            * (1 - theta)
            / (m * n)
            * (2 * big_n - 1 - (3 * big_n - 3) / ((2 - theta) * (1 + theta)))
        )
        return abs(estimate - theta) - _Z * math.sqrt(max(variance, 0.0))

    def solve(inside: float, outside: float) -> float:
        # gap(inside) <= 0 < gap(outside); bisection to float precision.
        for _ in range(80):
            middle = (inside + outside) / 2
            inside, outside = (middle, outside) if gap(middle) <= 0 else (inside, middle)
        return inside

    low = solve(estimate, 0.0) if gap(0.0) > 0 else 0.0
    high = solve(estimate, 1.0) if gap(1.0) > 0 else 1.0
    return low, high


def auroc_interval(logits: Tensor, labels: Tensor) -> Interval | None:
    """95 % interval of :func:`sic_core.metrics.auroc` (see the module docstring).

    Parameters
    ----------
    logits
        ``(N, C)`` scores (binary: the margin ``z_1 - z_0`` is what is ranked).
    labels
        ``(N,)`` integer classes.

    Returns
    -------
    Interval or None
        ``None`` under the small-cell rule or when the AUROC is undefined.
    """
    logits = logits.detach().double().cpu()
    labels = labels.detach().long().cpu()
    if has_small_cell(labels) or math.isnan(auroc(logits, labels)):
        return None
    if logits.shape[1] != 2:
        return bootstrap_interval(lambda index: auroc(logits[index], labels[index]), labels)
    scores = logits[:, 1] - logits[:, 0]
    positive = labels == 1
    psi = _psi(scores[positive], scores[~positive])
    m, n = psi.shape
    estimate = float(psi.mean())
    if estimate in (0.0, 1.0):
        low, high = _newcombe(estimate, m, n)
        return Interval(low, high, "newcombe")
    v10, v01 = psi.mean(dim=1), psi.mean(dim=0)
    variance = float(v10.var(unbiased=True) / m + v01.var(unbiased=True) / n)
    half = _Z * math.sqrt(max(variance, 0.0))
    return Interval(max(estimate - half, 0.0), min(estimate + half, 1.0), "delong")


def bootstrap_interval(
    statistic: Callable[[Tensor], float],
    strata: Tensor,
    *,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> Interval | None:
    """Stratified percentile bootstrap of ``statistic(index)`` over cases.

    Parameters
    ----------
    statistic
        Maps an ``(N,)`` int64 index tensor of resampled cases to the figure (``nan`` allowed:
        such replicates are dropped).
    strata
        ``(N,)`` integer class per case; each replicate resamples within every class.
    replicates, seed
        Bootstrap size and the seed of its generator (fixed: the same inputs give the same
        interval).

    Returns
    -------
    Interval or None
        ``None`` under the small-cell rule or when fewer than half the replicates are finite.
    """
    strata = strata.detach().long().cpu()
    if has_small_cell(strata):
        return None
    generator = torch.Generator().manual_seed(seed)
    groups = [torch.nonzero(strata == c).flatten() for c in strata.unique().tolist()]
    values = []
    for _ in range(replicates):
        index = torch.cat(
            [g[torch.randint(len(g), (len(g),), generator=generator)] for g in groups]
        )
        value = float(statistic(index))
        if math.isfinite(value):
            values.append(value)
    if len(values) < replicates / 2:
        return None
    ordered = torch.tensor(values, dtype=torch.float64)
    tail = (1 - LEVEL) / 2
    low, high = torch.quantile(ordered, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return Interval(float(low), float(high), "bootstrap")


def mean_interval(values: Tensor, strata: Tensor | None = None) -> Interval | None:
    """Bootstrap interval of the mean of per-case ``values`` (non-finite cases left out).

    ``strata`` (``(N,)`` classes) stratifies the resampling; without it all cases form one
    stratum. The small-cell rule counts the finite cases only.
    """
    values = values.detach().double().cpu().flatten()
    finite = torch.isfinite(values)
    values = values[finite]
    strata = (
        torch.zeros(values.numel(), dtype=torch.long)
        if strata is None
        else strata.detach().long().cpu().flatten()[finite]
    )
    return bootstrap_interval(lambda index: float(values[index].mean()), strata)
