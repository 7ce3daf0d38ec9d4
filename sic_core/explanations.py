"""Exact explanations of SIC predictions.

In explanation mode every dynamic scale (B-cos ``|cos|`` factors, norm statistics, the head's
``|cos|``) is detached, so the network is exactly linear in its encoded input
``x~ = [x, 1 - x]`` and each evidence ``e_k`` equals ``sum_p R^k_p`` with the contribution map::

    R^k_p = sum_channels x~ * d e_k / d x~        (per support k, at pixel p)
    R^c   = sum_{k : y_k = c} R^k                  (per class c)

so ``sum_p R^c_p = z_c - b`` exactly (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from bcos.common import gradient_to_image
from torch import Tensor

from sic_core.head import class_scores
from sic_core.model import SICModel

__all__ = [
    "Explanation",
    "SupportExplanation",
    "colour_explanation",
    "explain",
    "explain_support",
    "explanation_mode",
]


@contextmanager
def explanation_mode(model: SICModel) -> Iterator[SICModel]:
    """Detach every dynamic scale of ``model`` for the duration of the block.

    Usable as ``with explanation_mode(model):`` or as a decorator; the previous state of each
    module is restored in ``finally``, also when the block raises.
    """
    detachable = [m for m in model.modules() if hasattr(m, "set_explanation_mode")]
    previous_layers = [m.is_in_explanation_mode for m in detachable]
    previous_head = model.explaining
    try:
        for module in detachable:
            module.set_explanation_mode(True)
        model.explaining = True
        yield model
    finally:
        for module, was in zip(detachable, previous_layers, strict=True):
            module.set_explanation_mode(was)
        model.explaining = previous_head


@dataclass(frozen=True)
class Explanation:
    """Explanation of a batch of predictions (all tensors on CPU, float32).

    Attributes
    ----------
    logits
        ``(B, C)`` logits ``z``.
    evidence
        ``(B, K)`` evidence ``e_k`` of each support vector.
    bias
        Logit bias ``b``; ``z_c = sum_{k in c} e_k + b``.
    support_labels
        ``(K,)`` class of each support vector (class order).
    support_maps
        ``(B, K, H, W)`` contribution map of each support; ``sum_p R^k_p = e_k`` (``None``
        when explained with ``per_support=False``).
    class_maps
        ``(B, C, H, W)`` class maps ``R^c = sum_{k in c} R^k``.
    predicted
        ``(B,)`` argmax of the logits.
    target
        ``(B,)`` the class whose map ``input_gradient`` explains (default: predicted).
    encoded_input
        ``(B, 2*C_in, H, W)`` the encoded input ``[x, 1 - x]``.
    input_gradient
        ``(B, 2*C_in, H, W)`` dynamic linear map ``d z_target / d x~`` (colour explanations).
    """

    logits: Tensor
    evidence: Tensor
    bias: float
    support_labels: Tensor
    support_maps: Tensor | None
    class_maps: Tensor
    predicted: Tensor
    target: Tensor
    encoded_input: Tensor
    input_gradient: Tensor

    def target_maps(self) -> Tensor:
        """``(B, H, W)`` class map of each image's target class."""
        index = self.target.view(-1, 1, 1, 1).expand(-1, 1, *self.class_maps.shape[2:])
        return self.class_maps.gather(1, index).squeeze(1)

    def evidence_by_class(self) -> list[Tensor]:
        """Per class, the ``(B, n_c)`` evidence of its supports."""
        num_classes = self.logits.shape[1]
        return [self.evidence[:, self.support_labels == c] for c in range(num_classes)]

    def colour_image(self, index: int) -> np.ndarray:
        """B-cos colour explanation (``(H, W, 4)`` RGBA) of image ``index``'s target class."""
        return colour_explanation(self.encoded_input[index], self.input_gradient[index])


def _contributions(encoded: Tensor, outputs: Tensor) -> tuple[Tensor, Tensor]:
    """Maps ``(B, K, H, W)`` and input gradients ``(B, K, 2C, H, W)`` of ``outputs (B, K)``.

    Images are independent (no batch statistics), so the gradient of the batch sum of
    output ``k`` gives every image's own gradient in one backward pass per output.
    """
    gradients = []
    for k in range(outputs.shape[1]):
        (gradient,) = torch.autograd.grad(
            outputs[:, k].sum(), encoded, retain_graph=k < outputs.shape[1] - 1
        )
        gradients.append(gradient)
    stacked = torch.stack(gradients, dim=1)
    return (stacked * encoded.unsqueeze(1)).sum(dim=2), stacked


@contextmanager
def _explaining(model: SICModel) -> Iterator[None]:
    """Explanation mode on a frozen, evaluating model; everything restored afterwards.

    Parameter gradients are switched off so explaining never touches ``.grad``.
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    model.eval()
    try:
        with explanation_mode(model), torch.enable_grad():
            yield
    finally:
        for parameter, requires_grad in flags:
            parameter.requires_grad_(requires_grad)
        model.train(was_training)


def explain(
    model: SICModel, x: Tensor, target: Tensor | None = None, *, per_support: bool = True
) -> Explanation:
    """Explain the model's logits for a batch of images.

    Parameters
    ----------
    model
        A :class:`SICModel` with its support vectors set.
    x
        ``(B, C_in, H, W)`` float images in ``[0, 1]`` (on any device: they are explained on
        the model's, in float32, and the results come back to the CPU).
    target
        ``(B,)`` class per image for ``input_gradient`` (default: the predicted class).
    per_support
        Also compute each support's own map (one backward pass per support vector). With
        ``False`` only the class maps are computed, one backward pass per class (``K / C``
        times cheaper), and ``support_maps`` is ``None``; class maps, evidence and logits are
        the same.

    Returns
    -------
    Explanation
        Logits, evidence, per-support (unless ``per_support=False``) and per-class maps.
    """
    labels = model.support_labels
    with _explaining(model):
        encoded = model.encode(x.to(labels.device)).detach().requires_grad_(True)
        evidence = model.evidence(model.embedder(encoded))
        # Class scores are sums of evidence, so their maps are the sums of the support maps.
        outputs = evidence if per_support else class_scores(evidence, labels, model.num_classes)
        maps, gradients = _contributions(encoded, outputs)
    evidence = evidence.detach()
    logits = class_scores(evidence, labels, model.num_classes) + model.logit_bias
    predicted = logits.argmax(dim=1)
    chosen = predicted if target is None else target.to(predicted.device).long()
    if per_support:
        in_target = (labels.view(1, -1) == chosen.view(-1, 1)).to(gradients.dtype)
        input_gradient = (gradients * in_target.view(*in_target.shape, 1, 1, 1)).sum(dim=1)
        class_maps = torch.einsum("bkhw,kc->bchw", maps, _membership(labels, model))
        support_maps = maps.detach().cpu()
    else:
        input_gradient = gradients[torch.arange(chosen.numel(), device=chosen.device), chosen]
        class_maps, support_maps = maps, None
    return Explanation(
        logits=logits.cpu(),
        evidence=evidence.cpu(),
        bias=model.logit_bias,
        support_labels=labels.cpu(),
        support_maps=support_maps,
        class_maps=class_maps.detach().cpu(),
        predicted=predicted.cpu(),
        target=chosen.cpu(),
        encoded_input=encoded.detach().cpu(),
        input_gradient=input_gradient.detach().cpu(),
    )


def _membership(labels: Tensor, model: SICModel) -> Tensor:
    return torch.nn.functional.one_hot(labels.long(), model.num_classes).float()


@dataclass(frozen=True)
class SupportExplanation:
    """Explanation of the support side: why each support image matches its own vector.

    Attributes
    ----------
    similarity
        ``(K,)`` ``sim(f(x_k), s_k)``; equals ``||s_k||`` when ``s_k = f(x_k)``.
    maps
        ``(K, H, W)`` contribution maps of those similarities (``sum_p = similarity``).
    """

    similarity: Tensor
    maps: Tensor


def explain_support(model: SICModel, support_images: Tensor) -> SupportExplanation:
    """Contribution maps of each support image ``x_k`` for its similarity to ``s_k``.

    Parameters
    ----------
    model
        The model whose ``support_vectors`` the images belong to (same order).
    support_images
        ``(K, C_in, H, W)`` images in ``[0, 1]``, one per support vector.
    """
    if support_images.shape[0] != model.support_vectors.shape[0]:
        raise ValueError(
            f"support_images: expected {model.support_vectors.shape[0]} images (one per "
            f"support vector), got {support_images.shape[0]}"
        )
    with _explaining(model):
        device = model.support_vectors.device
        encoded = model.encode(support_images.to(device)).detach().requires_grad_(True)
        own = model.similarities(model.embedder(encoded)).diagonal()
        (gradient,) = torch.autograd.grad(own.sum(), encoded)
    maps = (gradient * encoded).sum(dim=1)
    return SupportExplanation(similarity=own.detach().cpu(), maps=maps.detach().cpu())


def colour_explanation(encoded: Tensor, gradient: Tensor) -> np.ndarray:
    """B-cos colour explanation (the ``bcos`` package's ``gradient_to_image``).

    Grey inputs (2 encoded channels) are expanded to the 6-channel RGB encoding the package
    expects by repeating each channel three times.

    Parameters
    ----------
    encoded
        ``(2*C_in, H, W)`` encoded image ``[x, 1 - x]``.
    gradient
        ``(2*C_in, H, W)`` dynamic linear map for the explained logit.

    Returns
    -------
    np.ndarray
        ``(H, W, 4)`` RGBA image in ``[0, 1]``.
    """
    if encoded.shape[0] == 2:
        encoded = encoded.repeat_interleave(3, dim=0)
        gradient = gradient.repeat_interleave(3, dim=0)
    return np.asarray(gradient_to_image(encoded, gradient))
