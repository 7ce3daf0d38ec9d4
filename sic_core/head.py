"""The SIC head: B-cos similarity of an embedding to labelled support vectors.

For an embedding ``q`` and support vectors ``s_k`` with labels ``y_k`` (b = 2)::

    sim(q, s_k) = |cos(q, s_k)| * (s_k / ||s_k||) . q          (eps = 1e-12 in norms)
    e_k         = sim(q, s_k) / T                               (evidence of support k)
    z_c         = sum_{k : y_k = c} e_k + b,   b = -log(max(C - 1, 2))

In explanation mode ``|cos|`` is detached, like every B-cos dynamic scale, so ``e_k`` is
linear in ``q`` and contributions add up exactly.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NORM_EPS",
    "bcos_similarity",
    "class_scores",
    "logit_bias",
    "per_sample_sic_loss",
    "sic_loss",
]

NORM_EPS = 1e-12


def logit_bias(num_classes: int) -> float:
    """The fixed logit bias ``b = -log(max(C - 1, 2))``.

    With non-negative evidence every class probability is then at least ``sigmoid(b)``,
    which is ``1/C`` for ``C > 2``.
    """
    return -math.log(max(num_classes - 1, 2))


def bcos_similarity(queries: Tensor, supports: Tensor, *, detach_scale: bool = False) -> Tensor:
    """B-cos kernel (b = 2) between every query and every support vector.

    ``sim(q, s) = |cos(q, s)| * (s_hat . q)`` with ``s_hat = s / (||s|| + eps)``. On
    non-negative vectors this equals ``(q . s_hat)^2 / ||q||``, is invariant to ``||s||``
    and is ``>= 0``.

    Parameters
    ----------
    queries
        ``(B, D)`` float embeddings.
    supports
        ``(K, D)`` float support vectors.
    detach_scale
        Detach ``|cos|`` (explanation mode) so the result is linear in ``queries``.

    Returns
    -------
    Tensor
        ``(B, K)`` similarities.
    """
    support_unit = supports / (supports.norm(dim=1, keepdim=True) + NORM_EPS)
    projection = queries @ support_unit.T
    scale = projection.abs() / (queries.norm(dim=1, keepdim=True) + NORM_EPS)
    if detach_scale:
        scale = scale.detach()
    return scale * projection


def class_scores(evidence: Tensor, support_labels: Tensor, num_classes: int) -> Tensor:
    """Sum evidence ``(B, K)`` over the supports of each class: ``(B, C)``."""
    membership = F.one_hot(support_labels.long(), num_classes).to(evidence.dtype)
    return evidence @ membership


def sic_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits on one-hot targets (mean over images and classes).

    B-cos networks train better with BCE than with softmax cross-entropy, as the reference
    implementation does.
    """
    one_hot = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, one_hot)


def per_sample_sic_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """:func:`sic_loss` per image, ``(B,)``: the mean over classes only."""
    one_hot = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, one_hot, reduction="none").mean(dim=1)
