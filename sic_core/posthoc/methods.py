"""The registry of explanation methods compared with SIC, and their batched explain functions.

Every method maps images ``x (N, C, H, W)`` in ``[0, 1]`` and a target class per image to
float maps ``(N, H, W)`` on the CPU, larger values meaning "more evidence for the target".
``sic`` is SIC's exact contribution map (:func:`sic_core.explain`); ``sic_gradcam`` is
Grad-CAM applied to SIC; every other method explains the black-box twin
(:class:`~sic_core.posthoc.twin.PlainCNN`) after the fact, through a well-kept library:

==================== ============ ===========================================================
name                 library      what the map is
==================== ============ ===========================================================
gradcam              captum       ``LayerGradCam`` on the last block, ReLU, bilinear upsampling
eigencam             grad-cam     ``EigenCAM``: first principal component of the last block
saliency             captum       ``Saliency``: ``|d z_t / d x|``, max over channels
integrated_gradients captum       ``IntegratedGradients`` from a black image, summed channels
occlusion            captum       ``Occlusion``: logit drop under a sliding black patch
lime                 captum       ``Lime`` (ridge) on SLIC superpixels (scikit-image), black
kernel_shap          captum       ``KernelShap`` on the same superpixels, black removed
iba                  sicfed       per-sample information bottleneck (:mod:`.iba`)
==================== ============ ===========================================================

The settings of each method are in its :class:`PosthocMethod` entry of :data:`METHODS`; the
four ``expensive`` ones (occlusion, LIME, SHAP, IBA: many forwards per image) are scored on
a fixed, small audit subset.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from sic_core.model import SICModel
from sic_core.posthoc.iba import feature_statistics, information_bottleneck
from sic_core.posthoc.twin import PlainCNN
from sic_core.wire_posthoc import METHOD_NAMES

__all__ = [
    "METHODS",
    "PosthocMethod",
    "bottleneck_layer",
    "explain_method",
    "feature_layer",
    "integrated_gradients_completeness",
    "superpixels",
]

Explainer = Callable[..., Tensor]


def feature_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: the twin's ``features[-1]``, SIC's last encoder block."""
    if isinstance(model, PlainCNN):
        return model.features[-1]
    if isinstance(model, SICModel):
        encoder = model.embedder.encoder
        blocks = getattr(encoder, "layers", None) or getattr(encoder, "stages", None)
        if blocks is not None:
            return blocks[-1]
    raise ValueError(f"model: no known feature layer for {type(model).__name__}")


def bottleneck_layer(model: nn.Module) -> nn.Module:
    """Where IBA's bottleneck sits: the third block (a quarter of the input size)."""
    if isinstance(model, PlainCNN):
        return model.features[2]
    if isinstance(model, SICModel) and hasattr(model.embedder.encoder, "layers"):
        return model.embedder.encoder.layers[2]
    raise ValueError(f"model: no known bottleneck layer for {type(model).__name__}")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (BatchNorm running statistics: images independent), restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _finish(maps: Tensor) -> Tensor:
    return maps.detach().float().cpu()


def _sic(model: nn.Module, x: Tensor, target: Tensor, **_: Any) -> Tensor:
    from sic_core.explanations import explain

    if not isinstance(model, SICModel):
        raise ValueError("sic: explains a SICModel only")
    return _finish(explain(model, x, target=target, per_support=False).target_maps())


def _gradcam(model: nn.Module, x: Tensor, target: Tensor, **_: Any) -> Tensor:
    from captum.attr import LayerAttribution, LayerGradCam

    with _evaluating(model):
        cam = LayerGradCam(model, feature_layer(model)).attribute(
            x, target=target, relu_attributions=True
        )
        maps = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return _finish(maps[:, 0])


def _eigencam(model: nn.Module, x: Tensor, target: Tensor, **_: Any) -> Tensor:
    from pytorch_grad_cam import EigenCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with _evaluating(model), EigenCAM(model, target_layers=[feature_layer(model)]) as cam:
        # Eigen-CAM is class-agnostic (a principal component); the targets are passed for form.
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target])
    return _finish(torch.from_numpy(np.asarray(maps)))


def _saliency(model: nn.Module, x: Tensor, target: Tensor, **_: Any) -> Tensor:
    from captum.attr import Saliency

    with _evaluating(model):
        gradient = Saliency(model).attribute(x, target=target, abs=True)
    return _finish(gradient.amax(dim=1))


def _integrated_gradients(
    model: nn.Module, x: Tensor, target: Tensor, *, n_steps: int, method: str, **_: Any
) -> Tensor:
    from captum.attr import IntegratedGradients

    with _evaluating(model):
        attribution = IntegratedGradients(model).attribute(
            x,
            baselines=torch.zeros_like(x),
            target=target,
            n_steps=n_steps,
            method=method,
            internal_batch_size=max(1, 512 // max(1, x.shape[0])) * x.shape[0],
        )
    return _finish(attribution.sum(dim=1))


def integrated_gradients_completeness(
    model: nn.Module, x: Tensor, target: Tensor, *, eps: float = 1e-6
) -> float:
    """``max_i |sum_p IG_i - (z_t(x_i) - z_t(0))| / max(|z_t(x_i) - z_t(0)|, eps)``.

    Integrated gradients' completeness axiom, computed with :data:`METHODS`' settings; the
    error is the Riemann (Gauss-Legendre) approximation of the path integral.
    """
    from captum.attr import IntegratedGradients

    settings = METHODS["integrated_gradients"].settings
    with _evaluating(model):
        attribution, delta = IntegratedGradients(model).attribute(
            x,
            baselines=torch.zeros_like(x),
            target=target,
            n_steps=int(settings["n_steps"]),
            method=str(settings["method"]),
            return_convergence_delta=True,
        )
        with torch.no_grad():
            rows = torch.arange(x.shape[0], device=x.device)
            gap = model(x)[rows, target] - model(torch.zeros_like(x))[rows, target]
    del attribution
    return float((delta.abs() / gap.abs().clamp_min(eps)).max())


def _occlusion(
    model: nn.Module, x: Tensor, target: Tensor, *, window: int, stride: int, **_: Any
) -> Tensor:
    from captum.attr import Occlusion

    channels = x.shape[1]
    with _evaluating(model), torch.no_grad():
        attribution = Occlusion(model).attribute(
            x,
            sliding_window_shapes=(channels, window, window),
            strides=(channels, stride, stride),
            baselines=0.0,
            target=target,
            perturbations_per_eval=64,
        )
    return _finish(attribution.sum(dim=1))


def superpixels(image: Tensor, *, n_segments: int, compactness: float) -> Tensor:
    """SLIC superpixels (scikit-image) of one ``(C, H, W)`` image: ``(H, W)`` int64 labels."""
    from skimage.segmentation import slic

    array = image.detach().cpu().permute(1, 2, 0).double().numpy()
    labels = slic(
        array if array.shape[2] > 1 else array[:, :, 0],
        n_segments=n_segments,
        compactness=compactness,
        channel_axis=-1 if array.shape[2] > 1 else None,
        start_label=0,
    )
    return torch.from_numpy(np.ascontiguousarray(labels)).long()


def _superpixel_attribution(
    attribute: Callable[..., Tensor],
    x: Tensor,
    target: Tensor,
    *,
    n_segments: int,
    compactness: float,
    n_samples: int,
    seed: int,
) -> Tensor:
    maps = []
    for index in range(x.shape[0]):
        mask = superpixels(x[index], n_segments=n_segments, compactness=compactness)
        # Captum samples with the global RNG: the same seed for every image makes each map
        # reproducible and independent of the image's place in the batch.
        torch.manual_seed(seed)
        attribution = attribute(
            x[index : index + 1],
            baselines=0.0,
            target=target[index : index + 1],
            feature_mask=mask.to(x.device).view(1, 1, *mask.shape),
            n_samples=n_samples,
            perturbations_per_eval=n_samples,
        )
        maps.append(attribution.sum(dim=1)[0])
    return _finish(torch.stack(maps)) if maps else torch.zeros(0, *x.shape[-2:])


def _lime(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    ridge_alpha: float,
    reference: Tensor | None = None,
    **settings: Any,
) -> Tensor:
    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    # Ridge, as the LIME paper's reference code; Captum's default Lasso (alpha 0.01) zeroes
    # every superpixel when the logit varies by less than that over the samples.
    lime = Lime(model, interpretable_model=SkLearnRidge(alpha=ridge_alpha))
    with _evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        return _superpixel_attribution(lime.attribute, x, target, **settings)


def _kernel_shap(
    model: nn.Module, x: Tensor, target: Tensor, *, reference: Tensor | None = None, **settings: Any
) -> Tensor:
    from captum.attr import KernelShap

    with _evaluating(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        return _superpixel_attribution(KernelShap(model).attribute, x, target, **settings)


def _iba(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    reference: Tensor | None = None,
    **settings: Any,
) -> Tensor:
    layer = bottleneck_layer(model)
    stats = feature_statistics(model, layer, x if reference is None else reference.to(x.device))
    return _finish(information_bottleneck(model, layer, x, target.long(), stats, **settings))


@dataclass(frozen=True)
class PosthocMethod:
    """One explanation method of the comparison.

    Attributes
    ----------
    name
        The method's name in ``posthoc/<name>/<metric>``.
    library
        The package that computes it (``captum``, ``grad-cam``, ``sicfed`` for code here).
    explains
        ``"twin"`` (the black-box CNN) or ``"sic"``.
    settings
        Keyword arguments of the explain function (also logged with the benchmark).
    expensive
        Many forwards per image: scored on the small audit subset.
    explainer
        ``explainer(model, x, target, reference=None, **settings) -> (N, H, W)``.
    """

    name: str
    library: str
    explains: Literal["twin", "sic"]
    explainer: Explainer
    settings: Mapping[str, Any] = field(default_factory=dict)
    expensive: bool = False

    def __call__(
        self, model: nn.Module, x: Tensor, target: Tensor, *, reference: Tensor | None = None
    ) -> Tensor:
        """Maps ``(N, H, W)`` (CPU float32) of ``model``'s ``target (N,)`` logits at ``x``."""
        target = target.to(x.device).long()
        return self.explainer(model, x, target, reference=reference, **self.settings)


def _entry(
    name: str, library: str, explains: str, explainer: Explainer, **kw: Any
) -> PosthocMethod:
    settings = MappingProxyType(kw.pop("settings", {}))
    return PosthocMethod(name, library, explains, explainer, settings, **kw)  # type: ignore[arg-type]


#: Every method of the comparison, in :data:`sic_core.wire_posthoc.METHOD_NAMES` order.
METHODS: Mapping[str, PosthocMethod] = MappingProxyType(
    {
        method.name: method
        for method in (
            _entry("sic", "sicfed", "sic", _sic),
            _entry("gradcam", "captum", "twin", _gradcam),
            _entry("eigencam", "grad-cam", "twin", _eigencam),
            _entry("saliency", "captum", "twin", _saliency),
            _entry(
                "integrated_gradients",
                "captum",
                "twin",
                _integrated_gradients,
                settings={"n_steps": 32, "method": "gausslegendre"},
            ),
            _entry(
                "occlusion",
                "captum",
                "twin",
                _occlusion,
                settings={"window": 8, "stride": 4},
                expensive=True,
            ),
            _entry(
                "lime",
                "captum",
                "twin",
                _lime,
                settings={
                    "n_segments": 50,
                    "compactness": 1.0,
                    "n_samples": 200,
                    "ridge_alpha": 1.0,
                    "seed": 0,
                },
                expensive=True,
            ),
            _entry(
                "kernel_shap",
                "captum",
                "twin",
                _kernel_shap,
                settings={"n_segments": 50, "compactness": 1.0, "n_samples": 200, "seed": 0},
                expensive=True,
            ),
            _entry(
                "iba",
                "sicfed",
                "twin",
                _iba,
                settings={"beta": 10.0, "steps": 10, "lr": 1.0, "initial_alpha": 5.0},
                expensive=True,
            ),
            _entry("sic_gradcam", "captum", "sic", _gradcam),
        )
    }
)
if tuple(sorted(METHODS)) != tuple(sorted(METHOD_NAMES)):  # pragma: no cover - import guard
    raise RuntimeError("sic_core.posthoc.METHODS and wire_posthoc.METHOD_NAMES disagree")


def explain_method(
    name: str, model: nn.Module, x: Tensor, target: Tensor, *, reference: Tensor | None = None
) -> Tensor:
    """Maps ``(N, H, W)`` of method ``name`` (one of :data:`METHODS`) for ``target (N,)``.

    ``reference`` images (IBA only) give the feature statistics of the bottleneck's noise;
    by default they are estimated from ``x`` itself.
    """
    if name not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {name!r}")
    return METHODS[name](model, x, target, reference=reference)
