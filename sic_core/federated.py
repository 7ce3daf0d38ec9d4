"""Weights for federated averaging of B-cos networks.

B-cos layers normalise each filter in the forward pass, so a filter's length does not change
the output but does weigh in a plain average: averaging raw weights tilts every filter toward
the site whose copy is longest. Sites therefore send filters rescaled to unit length (outputs
unchanged) and the server averages directions.
"""

from __future__ import annotations

import torch
from bcos.modules.bcosconv2d import NormedConv2d
from bcos.modules.bcoslinear import NormedLinear
from torch import Tensor, nn

__all__ = ["unit_filter_state_dict"]

_FILTER_EPS = 1e-12


def _normed_weight_names(model: nn.Module) -> set[str]:
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, NormedConv2d | NormedLinear)
    }


def unit_filter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``model.state_dict()`` with every B-cos filter at unit length.

    Only weights of layers that normalise their filters in the forward pass
    (``NormedConv2d``, ``NormedLinear``) are rescaled, each output filter on its own; every
    other entry (norm scales, support buffers) is copied unchanged. The model is not modified.
    """
    normed = _normed_weight_names(model)
    state: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        value = value.detach().clone()
        if name in normed:
            dims = tuple(range(1, value.dim()))
            norms = torch.linalg.vector_norm(value, dim=dims, keepdim=True)
            value = value / norms.clamp_min(_FILTER_EPS)
        state[name] = value
    return state
