"""Confidence intervals: DeLong / Newcombe for AUROC, stratified bootstrap, small cells."""

from __future__ import annotations

import math

import torch

from sic_core.metrics import auroc, balanced_accuracy
from sic_core.metrics.intervals import (
    MIN_CELL,
    auroc_interval,
    bootstrap_interval,
    format_interval,
    has_small_cell,
    mean_interval,
)


def _scores(n: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    margin = torch.randn(n, generator=generator) + shift * labels
    return torch.stack([torch.zeros(n), margin], dim=1), labels


def test_delong_interval_brackets_the_estimate_and_matches_the_bootstrap_spread() -> None:
    logits, labels = _scores(200, 1.0, seed=0)
    interval = auroc_interval(logits, labels)
    assert interval is not None and interval.method == "delong"
    estimate = auroc(logits, labels)
    assert interval.low < estimate < interval.high
    bootstrap = bootstrap_interval(lambda i: auroc(logits[i], labels[i]), labels)
    assert bootstrap is not None
    width, bootstrap_width = interval.high - interval.low, bootstrap.high - bootstrap.low
    assert abs(width - bootstrap_width) / bootstrap_width < 0.25


def test_delong_interval_narrows_with_more_cases() -> None:
    small = auroc_interval(*_scores(100, 1.0, seed=1))
    large = auroc_interval(*_scores(1600, 1.0, seed=1))
    assert small is not None and large is not None
    ratio = (large.high - large.low) / (small.high - small.low)
    assert 0.15 < ratio < 0.4  # about 1 / sqrt(16)


def test_perfect_separation_still_gets_an_honest_interval() -> None:
    labels = torch.arange(30) % 2
    logits = torch.stack([torch.zeros(30), labels.float() + 0.01 * torch.arange(30)], dim=1)
    assert auroc(logits, labels) == 1.0
    interval = auroc_interval(logits, labels)
    assert interval is not None and interval.method == "newcombe"
    assert interval.high == 1.0
    assert 0.7 < interval.low < 0.99


def test_small_cells_withhold_every_interval() -> None:
    labels = torch.tensor([1] * (MIN_CELL - 1) + [0] * 40)
    logits = torch.stack([torch.zeros(len(labels)), torch.randn(len(labels))], dim=1)
    assert has_small_cell(labels)
    assert auroc_interval(logits, labels) is None
    assert bootstrap_interval(lambda i: 0.5, labels) is None
    assert mean_interval(torch.ones(MIN_CELL - 1)) is None
    assert format_interval(None) == f"n<{MIN_CELL}"
    enough = torch.tensor([1] * MIN_CELL + [0] * 40)
    assert not has_small_cell(enough)
    assert auroc_interval(torch.stack([torch.zeros(50), torch.randn(50)], dim=1), enough)


def test_bootstrap_is_stratified_and_seeded() -> None:
    labels = torch.tensor([0] * 30 + [1] * 12)
    counts = set()

    def positives(index: torch.Tensor) -> float:
        counts.add(int(labels[index].sum()))
        return balanced_accuracy(labels[index], labels[index])

    first = bootstrap_interval(positives, labels, replicates=200)
    assert counts == {12}
    predicted = torch.randint(2, (42,), generator=torch.Generator().manual_seed(0))
    a = bootstrap_interval(lambda i: balanced_accuracy(predicted[i], labels[i]), labels)
    b = bootstrap_interval(lambda i: balanced_accuracy(predicted[i], labels[i]), labels)
    assert a == b and first is not None


def test_mean_interval_ignores_cases_without_a_value() -> None:
    values = torch.cat([torch.linspace(0, 1, 40), torch.full((5,), math.nan)])
    interval = mean_interval(values)
    assert interval is not None
    assert interval.low < 0.5 < interval.high
    assert format_interval(interval).startswith("[")
