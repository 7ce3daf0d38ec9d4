"""DP-SGD wiring: per-sample gradients of the fixed-support loss are real and per image."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sic_core import anchor_support, create_model, list_encoders
from sic_core.head import per_sample_sic_loss
from sic_core.training import fixed_support_logits

ENCODER_SIZES = {"bcos_cnn_small": {}, "bcos_resnet18": {"width": 8}}


def _model(name: str):
    torch.manual_seed(0)
    return create_model(
        name, in_channels=1, num_classes=3, n_shot=2, proj_dim=16, **ENCODER_SIZES[name]
    )


def test_every_registered_encoder_is_covered() -> None:
    assert set(list_encoders()) == set(ENCODER_SIZES)


@pytest.mark.parametrize("name", list_encoders())
def test_no_batch_statistics_and_no_buffers_in_trainable_modules(name: str) -> None:
    model = _model(name)
    for module_name, module in model.embedder.named_modules():
        assert not isinstance(module, _BatchNorm | nn.InstanceNorm2d), module_name
        has_parameters = any(True for _ in module.parameters(recurse=False))
        has_buffers = any(True for _ in module.buffers(recurse=False))
        assert not (has_parameters and has_buffers), module_name


@pytest.mark.parametrize("name", list_encoders())
def test_opacus_per_sample_gradients_equal_a_per_example_loop(name: str) -> None:
    # float64 isolates the per-sample maths from float32 rounding in deep encoders.
    model = _model(name).double()
    anchors = anchor_support(3, 2, 16, seed=1)
    support = type(anchors)(anchors.vectors.double(), anchors.labels, anchors.indices)
    images = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(2)).double()
    labels = torch.tensor([0, 1, 2, 1, 0])

    wrapped = GradSampleModule(model.embedder, loss_reduction="sum")
    logits = fixed_support_logits(model, images, support, embedder=wrapped)
    per_sample_sic_loss(logits, labels).sum().backward()
    parameters = [p for p in model.embedder.parameters() if p.requires_grad]
    vectorised = [p.grad_sample.detach().clone() for p in parameters]
    wrapped.zero_grad()
    wrapped._close()

    for i in range(images.shape[0]):
        model.embedder.zero_grad()
        single = fixed_support_logits(model, images[i : i + 1], support)
        per_sample_sic_loss(single, labels[i : i + 1]).sum().backward()
        for parameter, per_sample in zip(parameters, vectorised, strict=True):
            # The per-sample rows are the query images only: there are no support images.
            assert per_sample.shape[0] == images.shape[0]
            expected = parameter.grad
            error = (per_sample[i] - expected).norm() / expected.norm().clamp_min(1e-12)
            assert error < 1e-5, (name, i, float(error))
