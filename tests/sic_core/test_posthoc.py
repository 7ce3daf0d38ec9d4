"""The black-box twin, the post-hoc method registry, IBA, and the scoring of every method."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sic_core import create_model, embed_all
from sic_core.encoders import SmallBcosCNN
from sic_core.metrics import cascade_rank_correlations, max_sensitivity, parameter_layers
from sic_core.posthoc import (
    METHODS,
    PlainCNN,
    explain_method,
    feature_statistics,
    information_bottleneck,
    integrated_gradients_completeness,
)
from sic_core.posthoc.scoring import AuditCases, ScoringConfig, fixed_subset, score_method
from sic_core.support import select_support
from sic_core.wire_posthoc import (
    COMPLETE_METHODS,
    METHOD_NAMES,
    BaselineMetric,
    posthoc_key,
    posthoc_metric_keys,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_twin_has_the_small_encoders_widths_and_strides() -> None:
    twin = PlainCNN(width=8)
    encoder = SmallBcosCNN(2, width=8)
    convs = [block[0] for block in twin.features]
    bcos_convs = [block[1] for block in encoder.layers]  # (padding, BcosConv2d, norm)
    assert [c.out_channels for c in convs] == [c.out_channels for c in bcos_convs]
    assert [c.stride[0] for c in convs] == [c.stride for c in bcos_convs]
    assert all(isinstance(block[1], nn.BatchNorm2d) for block in twin.features)
    x = torch.rand(3, 1, 32, 32)
    assert twin.features(x).shape == encoder(torch.cat([x, 1 - x], 1)).shape
    assert twin(x).shape == (3, 2)


def test_the_registry_lists_every_method_with_its_library_and_settings() -> None:
    assert tuple(METHODS) == METHOD_NAMES
    assert {m.library for m in METHODS.values()} == {"captum", "grad-cam", "sicfed"}
    assert {name for name, m in METHODS.items() if m.explains == "sic"} == {"sic", "sic_gradcam"}
    assert {name for name, m in METHODS.items() if m.expensive} == {
        "occlusion",
        "lime",
        "kernel_shap",
        "iba",
    }
    assert METHODS["iba"].settings["beta"] == 10.0
    with pytest.raises(TypeError):
        METHODS["lime"].settings["n_samples"] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="expected one of"):
        explain_method("shap", PlainCNN(), torch.rand(1, 1, 16, 16), torch.zeros(1))


def _twin() -> PlainCNN:
    """An untrained twin whose head weights are positive, so that Grad-CAM's ReLU keeps some
    of every map (pooled features are non-negative after the last ReLU)."""
    torch.manual_seed(0)
    twin = PlainCNN(width=8)
    with torch.no_grad():
        twin.head.weight.abs_()
    return twin


def _sic_model(images: Tensor, labels: Tensor):
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, width=8)
    support = select_support(embed_all(model, images), labels, 2, model.n_shot)
    model.set_support(support.vectors, support.labels)
    return model, images[support.indices], support.labels


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_returns_finite_maps_per_image_and_leaves_the_model_as_it_was(
    name: str, disc_images
) -> None:
    images, labels, _ = disc_images(4, 32)
    model = _sic_model(images, labels)[0] if METHODS[name].explains == "sic" else _twin()
    model.train()
    maps = explain_method(name, model, images, labels, reference=images)
    assert maps.shape == (4, 32, 32) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    if name != "iba":  # IBA's noise is drawn per batch; every other map is deterministic
        # Each image's map is its own: explaining one image alone gives the same map.
        alone = explain_method(name, model, images[1:2], labels[1:2])
        tolerance = 1e-5 * float(maps.abs().max())
        assert torch.allclose(alone[0], maps[1], rtol=1e-3, atol=tolerance)


def test_saliency_is_the_absolute_input_gradient_of_the_target_logit() -> None:
    torch.manual_seed(0)
    model = PlainCNN(width=8).eval()
    x = torch.rand(3, 1, 16, 16, requires_grad=True)
    target = torch.tensor([0, 1, 1])
    (gradient,) = torch.autograd.grad(model(x).gather(1, target[:, None]).sum(), x)
    assert torch.allclose(
        explain_method("saliency", model, x.detach(), target), gradient.abs()[:, 0]
    )


def test_integrated_gradients_completeness_is_exact_on_a_linear_model_and_sums_the_map() -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = torch.rand(3, 1, 8, 8)
    target = torch.tensor([0, 1, 0])
    assert integrated_gradients_completeness(linear, x, target) < 1e-5
    twin = PlainCNN(width=8).eval()
    maps = explain_method("integrated_gradients", twin, x, target)
    with torch.no_grad():
        rows = torch.arange(3)
        gap = twin(x)[rows, target] - twin(torch.zeros_like(x))[rows, target]
    expected = float(((maps.sum(dim=(1, 2)) - gap).abs() / gap.abs()).max())
    assert integrated_gradients_completeness(twin, x, target) == pytest.approx(expected, rel=1e-3)


class _LeftHalf(nn.Module):
    """A classifier whose logit reads only the left half of its first feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Conv2d(1, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        features = self.layer(x)
        return self.head(features[..., : x.shape[-1] // 2].mean(dim=(2, 3)) * 50)


def test_iba_keeps_information_only_where_the_output_reads_it() -> None:
    torch.manual_seed(0)
    model = _LeftHalf()
    images = torch.rand(16, 1, 16, 16)
    stats = feature_statistics(model, model.layer, images)
    target = model(images[:4]).argmax(1)
    # beta 0.1: this two-class toy's cross-entropy is small against the paper's beta = 10.
    bits = information_bottleneck(
        model, model.layer, images[:4], target, stats, beta=0.1, smoothing=0
    )
    assert bits.shape == (4, 16, 16) and (bits >= 0).all()
    left, right = bits[..., 2:6].mean(), bits[..., 10:14].mean()
    assert left > 5 * right
    heavy = information_bottleneck(
        model, model.layer, images[:4], target, stats, beta=1e4, smoothing=0
    )
    assert heavy.sum() < bits.sum()


def test_max_sensitivity_takes_any_explainer() -> None:
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    x = torch.rand(4, 1, 8, 8)

    def saliency(model: nn.Module, images: Tensor, target: Tensor) -> Tensor:
        return explain_method("saliency", model, images, target)

    def input_times_gradient(model: nn.Module, images: Tensor, target: Tensor) -> Tensor:
        return images[:, 0] * saliency(model, images, target)

    # A linear model's gradient does not depend on the input; input x gradient does.
    assert max_sensitivity(linear, x, samples=3, explainer=saliency) == 0.0
    assert max_sensitivity(linear, x, samples=3, explainer=input_times_gradient) > 0.0


def test_cascading_randomisation_of_the_twin_changes_gradient_maps() -> None:
    torch.manual_seed(0)
    twin = PlainCNN(width=8).eval()
    fresh = PlainCNN(width=8)
    x = torch.rand(4, 1, 16, 16)
    target = torch.tensor([0, 1, 0, 1])
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    layers = parameter_layers(twin)
    assert [name for name, _ in layers] == [f"features.{i}" for i in range(5)] + ["head"]
    assert layers[0][1] == ["features.0.0", "features.0.1"]  # convolution and its BatchNorm

    def saliency(model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
        return explain_method("saliency", model, images, classes)

    steps = cascade_rank_correlations(twin, x, target, saliency, fresh=fresh, layers=layers)
    assert [name for name, _ in steps] == [
        "none",
        "head",
        *[f"features.{i}" for i in range(4, -1, -1)],
    ]
    assert steps[0][1] == pytest.approx(1.0)
    assert steps[-1][1] < 0.9
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())


def test_fixed_subset_interleaves_the_classes() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1])
    assert fixed_subset(labels, 4).tolist() == [0, 1, 4, 5]
    assert fixed_subset(labels, 20).tolist() == list(range(8))


def test_posthoc_keys_are_the_contract() -> None:
    assert posthoc_key("lime", "rma_lift") == "posthoc/lime/rma_lift"
    assert BaselineMetric.AUROC == "baseline/perf/auroc"
    with pytest.raises(ValueError, match="method"):
        posthoc_key("shap", "rma_lift")
    with pytest.raises(ValueError, match="metric"):
        posthoc_key("lime", "lift")
    keys = posthoc_metric_keys()
    assert "posthoc/sic/completeness_max_rel_err" in keys
    assert "posthoc/integrated_gradients/completeness_max_rel_err" in keys
    assert "posthoc/gradcam/completeness_max_rel_err" not in keys
    assert {"sic", "integrated_gradients"} == COMPLETE_METHODS


def _cases(disc_images) -> tuple[AuditCases, Tensor, Tensor]:
    images, labels, masks = disc_images(8, 32)
    marker = torch.zeros(4, 32, 32, dtype=torch.bool)
    marker[:, 1:4, 1:9] = True
    marked = images[:4].clone()
    marked[:, :, marker[0]] = 1.0
    cases = AuditCases(images, labels, masks[:, 0].bool(), marked, marker, images[4:])
    return cases, images, labels


SMALL = ScoringConfig(
    subset=4,
    steps=4,
    curve_images=4,
    sensitivity_images=2,
    sensitivity_samples=1,
    randomisation_images=2,
    marked_images=2,
)


@pytest.mark.parametrize("name", ["sic", "gradcam", "integrated_gradients", "occlusion"])
def test_score_method_reports_every_posthoc_key(name: str, disc_images) -> None:
    cases, images, labels = _cases(disc_images)
    if METHODS[name].explains == "sic":
        model, support_images, support_labels = _sic_model(images, labels)
        fresh = create_model("bcos_cnn_small", in_channels=1, num_classes=2, width=8)

        def refresh(randomised: nn.Module) -> None:
            randomised.set_support(embed_all(randomised, support_images), support_labels)

        scores = score_method(name, model, cases, fresh=fresh, refresh=refresh, config=SMALL)
    else:
        scores = score_method(name, _twin(), cases, fresh=PlainCNN(width=8), config=SMALL)
    assert set(scores) == posthoc_metric_keys((name,))
    for key in (
        "seconds_per_image",
        "deletion_auc",
        "insertion_auc",
        "randomisation_rank_corr",
        "max_sensitivity",
        "artifact_mass_lift",
        "marker_counterfactual_shift",
    ):
        assert math.isfinite(scores[posthoc_key(name, key)]), key
    assert scores[posthoc_key(name, "seconds_per_image")] > 0
    if name == "sic":
        assert scores[posthoc_key(name, "completeness_max_rel_err")] < 1e-4
