"""Site data: DICOM, MedMNIST and image-folder inputs, preprocessed with MONAI and cached.

Public API
----------
load_site_data
    The whole pipeline of one site (cached), returning its train/val/test tensors.
load_dicom_image
    One DICOM file to a float32 ``(1, size, size)`` image in [0, 1], or ``DataError``.
training_augmentation
    The site's seeded per-batch augmentation (image and masks move together).
Reason
    The reason codes carried by ``DataError.reason``.

Names are imported on first use, so that light modules of this package (``splits``,
``reasons``) do not pull in MONAI and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.data.dicom import DicomOptions
    from client.data.loaders import Record, load_dicom_image
    from client.data.quarantine import QuarantineEntry, read_quarantine_report
    from client.data.reasons import Reason
    from client.data.site import SiteData, SplitData, load_site_data
    from client.data.splits import SPLITS, Split, assign_patient_splits
    from client.data.transforms import TrainingAugmentation, training_augmentation
    from sic_core.errors import DataError

_EXPORTS = {
    "SPLITS": "client.data.splits",
    "DataError": "sic_core.errors",
    "DicomOptions": "client.data.dicom",
    "QuarantineEntry": "client.data.quarantine",
    "Reason": "client.data.reasons",
    "Record": "client.data.loaders",
    "SiteData": "client.data.site",
    "Split": "client.data.splits",
    "SplitData": "client.data.site",
    "TrainingAugmentation": "client.data.transforms",
    "assign_patient_splits": "client.data.splits",
    "load_dicom_image": "client.data.loaders",
    "load_site_data": "client.data.site",
    "read_quarantine_report": "client.data.quarantine",
    "training_augmentation": "client.data.transforms",
}

__all__ = [
    "SPLITS",
    "DataError",
    "DicomOptions",
    "QuarantineEntry",
    "Reason",
    "Record",
    "SiteData",
    "Split",
    "SplitData",
    "TrainingAugmentation",
    "assign_patient_splits",
    "load_dicom_image",
    "load_site_data",
    "read_quarantine_report",
    "training_augmentation",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'client.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
