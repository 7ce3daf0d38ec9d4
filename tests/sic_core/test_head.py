"""The SIC head: B-cos kernel, class scores, logit bias."""

from __future__ import annotations

import math

import torch

from sic_core import create_model
from sic_core.head import bcos_similarity, logit_bias


def test_kernel_on_non_negative_tensors() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.rand(6, 16, generator=generator)
    s = torch.rand(4, 16, generator=generator)
    sim = bcos_similarity(q, s)
    s_unit = s / s.norm(dim=1, keepdim=True)
    expected = (q @ s_unit.T) ** 2 / q.norm(dim=1, keepdim=True)
    torch.testing.assert_close(sim, expected)
    torch.testing.assert_close(bcos_similarity(q, 3.7 * s), sim)
    assert (sim >= 0).all()


def test_logit_bias() -> None:
    assert logit_bias(2) == -math.log(2)
    assert logit_bias(3) == -math.log(2)
    assert logit_bias(5) == -math.log(4)


def test_logits_are_bias_plus_class_sum_of_similarities_over_temperature() -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=3, n_shot=2, proj_dim=8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    model.set_support(torch.rand(6, 8), labels)
    x = torch.rand(5, 1, 16, 16)
    q = model.embed(x)
    sim = bcos_similarity(q, model.support_vectors)
    expected = torch.stack(
        [sim[:, labels == c].sum(dim=1) / model.temperature for c in range(3)], dim=1
    )
    torch.testing.assert_close(model(x), expected + model.logit_bias)


def test_embeddings_non_negative_and_probabilities_bounded_below() -> None:
    torch.manual_seed(0)
    for num_classes in (3, 5):
        model = create_model("bcos_cnn_small", 1, num_classes, n_shot=2, proj_dim=8)
        model.set_support(
            torch.rand(2 * num_classes, 8), torch.arange(num_classes).repeat_interleave(2)
        )
        x = torch.rand(6, 1, 16, 16)
        assert (model.embed(x) >= 0).all()
        logits = model(x)
        assert (logits >= model.logit_bias - 1e-6).all()
        assert (torch.sigmoid(logits) >= 1 / num_classes - 1e-6).all()
