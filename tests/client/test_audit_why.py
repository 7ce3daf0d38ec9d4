"""'Why similar' and the explanation metrics' intervals on a site's audit set."""

from __future__ import annotations

import math

import torch

from client.audit import WHY_PROFILE_CASES, audit_intervals, audit_why_similar, select_audit_set
from sic_core import create_model, explain
from sic_core.metrics.intervals import MIN_CELL
from sic_core.why_similar import PROPERTIES
from sic_core.wire import WhyMetric, XaiMetric


def _audit(n: int, size: int = 24):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, size, size, generator=generator) * 0.5
    labels = torch.arange(n) % 2
    lesion = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    lesion[labels == 1, :, 8:14, 8:14] = 1
    images[labels == 1, :, 8:14, 8:14] += 0.5
    return select_audit_set(images, labels, {"lesion": lesion}, size=n, seed=0)


def _model():
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=2, proj_dim=16, width=8)
    model.set_support(torch.rand(4, 16) + 0.1, torch.tensor([0, 0, 1, 1]))
    return model


def test_why_similar_covers_the_profile_cases_and_the_extra_gallery_cases() -> None:
    audit, model = _audit(WHY_PROFILE_CASES + 4), _model()
    explanation = explain(model, audit.images, per_support=False)
    support_images = audit.images[:4]
    present = torch.tensor([True, True, True, False])
    extra = WHY_PROFILE_CASES + 2
    why = audit_why_similar(
        model, audit, explanation, support_images, present, extra_cases=[extra, 0]
    )
    profile_pairs = why.pairs[why.pairs[:, 0] < WHY_PROFILE_CASES]
    assert profile_pairs.shape[0] == WHY_PROFILE_CASES * 3  # every present support
    assert not (why.pairs[:, 1] == 3).any()  # no local image, no pair
    extra_supports = why.pairs[why.pairs[:, 0] == extra, 1]
    predicted = int(explanation.predicted[extra])
    assert extra_supports.numel() >= 1
    assert all(int(model.support_labels[k]) == predicted for k in extra_supports)
    assert not why.top[why.pairs[:, 0] == extra].any()
    influence = why.of(extra, int(extra_supports[0]))
    assert influence is not None and set(influence) == set(PROPERTIES)
    assert why.of(extra, 3) is None
    assert why.profiles.shape == (4, len(PROPERTIES)) and why.profiles[3].isnan().all()
    metrics = why.metrics()
    assert set(metrics) == {str(key) for key in WhyMetric}
    assert all(math.isfinite(v) and -1 <= v <= 1 for v in metrics.values())


def test_explanation_metric_intervals_follow_the_small_cell_rule() -> None:
    model = _model()
    small = _audit(2 * (MIN_CELL - 1))
    intervals = audit_intervals(model, small, explain(model, small.images, per_support=False))
    assert intervals[str(XaiMetric.GINI)] is None
    large = _audit(40)
    intervals = audit_intervals(model, large, explain(model, large.images, per_support=False))
    gini = intervals[str(XaiMetric.GINI)]
    assert gini is not None and gini.low <= gini.high
    assert str(XaiMetric.RMA_LIFT) in intervals
