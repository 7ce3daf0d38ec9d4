"""Explanations are exact: contributions add up to the logits."""

from __future__ import annotations

import pytest
import torch

from sic_core import (
    ConfigError,
    create_model,
    explain,
    explain_support,
    explanation_mode,
    list_encoders,
)
from sic_core.explanations import colour_explanation

ENCODER_SIZES = {"bcos_cnn_small": {}, "bcos_resnet18": {"width": 8}}


def _model(name: str, num_classes: int = 3, n_shot: int = 2):
    torch.manual_seed(0)
    model = create_model(name, 1, num_classes, n_shot=n_shot, proj_dim=32, **ENCODER_SIZES[name])
    k = num_classes * n_shot
    model.set_support(torch.rand(k, 32) + 0.05, torch.arange(num_classes).repeat_interleave(n_shot))
    return model


@pytest.mark.parametrize("name", list_encoders())
def test_completeness_for_every_class(name: str) -> None:
    model = _model(name)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    result = explain(model, x)
    torch.testing.assert_close(result.logits, model(x).detach())
    target = result.logits - result.bias
    relative = (result.class_maps.sum(dim=(2, 3)) - target).abs() / target.abs()
    assert relative.max() < 1e-5
    torch.testing.assert_close(
        result.support_maps.sum(dim=(2, 3)), result.evidence, rtol=1e-5, atol=1e-7
    )
    by_class = torch.stack(
        [result.support_maps[:, result.support_labels == c].sum(dim=1) for c in range(3)], dim=1
    )
    torch.testing.assert_close(by_class, result.class_maps)
    torch.testing.assert_close(
        torch.stack([e.sum(dim=1) for e in result.evidence_by_class()], dim=1) + result.bias,
        result.logits,
    )


@pytest.mark.parametrize("name", list_encoders())
def test_class_maps_alone_equal_the_sums_of_the_support_maps(name: str) -> None:
    model = _model(name)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 1])
    full = explain(model, x, target=target)
    cheap = explain(model, x, target=target, per_support=False)
    assert cheap.support_maps is None
    torch.testing.assert_close(cheap.class_maps, full.class_maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cheap.input_gradient, full.input_gradient, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cheap.logits, full.logits)
    torch.testing.assert_close(cheap.evidence, full.evidence)


def test_support_image_against_its_own_vector_sums_to_its_norm() -> None:
    model = _model("bcos_cnn_small")
    images = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    model.set_support(model.embed(images).detach(), torch.arange(3).repeat_interleave(2))
    result = explain_support(model, images)
    norms = model.support_vectors.norm(dim=1)
    torch.testing.assert_close(result.similarity, norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.maps.sum(dim=(1, 2)), norms, rtol=1e-5, atol=1e-6)


def test_explanation_mode_detaches_and_forward_values_agree() -> None:
    model = _model("bcos_cnn_small")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))

    def input_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        encoded = model.encode(x).detach().requires_grad_(True)
        logits = model.logits_from_embeddings(model.embedder(encoded))
        (gradient,) = torch.autograd.grad(logits[:, 0].sum(), encoded)
        return logits.detach(), gradient

    plain_logits, plain_gradient = input_gradient()
    with explanation_mode(model):
        detached_logits, detached_gradient = input_gradient()
    torch.testing.assert_close(detached_logits, plain_logits)
    assert not torch.allclose(detached_gradient, plain_gradient, rtol=1e-3, atol=1e-6)


def test_explanation_mode_is_restored_after_exit_and_after_an_exception() -> None:
    model = _model("bcos_cnn_small")
    detachable = [m for m in model.modules() if hasattr(m, "set_explanation_mode")]
    assert detachable
    with explanation_mode(model):
        assert model.explaining and all(m.is_in_explanation_mode for m in detachable)
    assert not model.explaining and not any(m.is_in_explanation_mode for m in detachable)
    with pytest.raises(RuntimeError, match="boom"), explanation_mode(model):
        raise RuntimeError("boom")
    assert not model.explaining and not any(m.is_in_explanation_mode for m in detachable)

    @explanation_mode(model)
    def inside() -> bool:
        return model.explaining

    assert inside() and not model.explaining


def test_explaining_twice_is_identical_and_leaves_no_parameter_gradients() -> None:
    model = _model("bcos_cnn_small")
    model.train()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    first = explain(model, x)
    second = explain(model, x)
    assert torch.equal(first.support_maps, second.support_maps)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert model.training


def test_target_maps_and_colour_explanation() -> None:
    model = _model("bcos_cnn_small")
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([2, 0])
    result = explain(model, x, target=target)
    torch.testing.assert_close(result.target_maps()[0], result.class_maps[0, 2])
    torch.testing.assert_close(result.target_maps()[1], result.class_maps[1, 0])
    # The target's input gradient times the input is that class's map.
    torch.testing.assert_close(
        (result.input_gradient * result.encoded_input).sum(dim=1),
        result.target_maps(),
        rtol=1e-5,
        atol=1e-7,
    )
    rgba = result.colour_image(0)
    assert rgba.shape == (32, 32, 4)
    assert colour_explanation(result.encoded_input[1], result.input_gradient[1]).shape == (
        32,
        32,
        4,
    )


def test_inputs_outside_unit_interval_are_rejected() -> None:
    model = _model("bcos_cnn_small")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explain(model, torch.full((1, 1, 8, 8), 1.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.full((1, 1, 8, 8), -0.1))
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(1, 3, 8, 8))


def test_average_pooling_is_available_and_exact() -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=16, pool="avg", width=8)
    model.set_support(torch.rand(2, 16) + 0.1, torch.tensor([0, 1]))
    result = explain(model, torch.rand(3, 1, 24, 24))
    target = result.logits - result.bias
    assert ((result.class_maps.sum(dim=(2, 3)) - target).abs() / target.abs()).max() < 1e-5
    with pytest.raises(ConfigError, match="pool"):
        create_model("bcos_cnn_small", 1, 2, pool="median")
