"""The site's compute device: ``compute.device`` resolved, checked and named.

Every computation at a site (local training with or without DP-SGD, support statistics,
evaluation, the explanation audit and report, ``client sanity``, ``client pretrain``) runs on
the device :func:`site_device` returns. The site's images stay in host memory; each batch
moves to the device as it is used, and results come back to the CPU before they go on the
wire. A device that is asked for but missing is a :class:`~sic_core.errors.ConfigError`
naming ``compute.device`` and what this machine has: a site never falls back to the CPU
silently (``client check`` and ``client join`` stop on it; a ClientApp message fails with
``config_error``).

Examples
--------
>>> resolve_device("cpu")
device(type='cpu')
>>> device_label(torch.device("cpu"))
'cpu'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from sic_core.errors import ConfigError

if TYPE_CHECKING:
    from client.config import SiteConfig

__all__ = ["describe_device", "device_label", "resolve_device", "site_device"]

_FIELD = "compute.device"
#: Characters a device label may carry off the site (a GPU's model name, nothing else).
_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9 ._()-]")
_LABEL_NAME_CHARS = 64


def _cuda_found() -> str:
    """What this machine offers for CUDA, in words (for the error of a missing GPU)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    count = torch.cuda.device_count()
    if count == 0:
        return (
            f"no CUDA device is visible (torch {torch.__version__}, CUDA {torch.version.cuda}; "
            "a container needs `--gpus all` or CDI and the NVIDIA Container Toolkit)"
        )
    names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(count))
    return f"this machine has {count} CUDA device{'s' if count > 1 else ''}: {names}"


def resolve_device(setting: str) -> torch.device:
    """The device that ``compute.device: <setting>`` names on this machine.

    Parameters
    ----------
    setting
        ``auto`` (the first CUDA device if there is one, else the CPU), ``cpu``, ``cuda``
        (the first CUDA device) or ``cuda:N``.

    Raises
    ------
    ConfigError
        If a CUDA device is asked for and this machine has none, or not that one; the
        message names ``compute.device`` and what was found.
    """
    if setting == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if setting == "cpu":
        return torch.device("cpu")
    index = 0 if setting == "cuda" else int(setting.removeprefix("cuda:"))
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ConfigError(
            f"{_FIELD}: {setting!r} asks for a CUDA GPU but {_cuda_found()}; set "
            f"{_FIELD} to cpu (or auto) to compute on the CPU"
        )
    return torch.device("cuda", index)


def site_device(config: SiteConfig) -> torch.device:
    """The device the site's ``compute.device`` resolves to (see :func:`resolve_device`)."""
    return resolve_device(config.compute.device)


def device_label(device: torch.device) -> str:
    """The device as it may leave the site: ``cpu``, or ``cuda:N`` and the GPU's model name.

    Nothing that identifies the machine (no serial number, UUID or host name) is included;
    the model name is cut to a fixed alphabet and length.
    """
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _LABEL_UNSAFE.sub("", torch.cuda.get_device_name(index))[:_LABEL_NAME_CHARS].strip()
    return f"cuda:{index} {name}" if name else f"cuda:{index}"


def describe_device(device: torch.device) -> str:
    """One line for the site's operator: the GPU's name and memory, or the CPU's threads."""
    if device.type != "cuda":
        return f"cpu ({torch.get_num_threads()} threads)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return f"cuda:{index} {properties.name} ({properties.total_memory / 2**30:.1f} GiB)"
