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
"""

from client.data.dicom import DicomOptions
from client.data.loaders import Record, load_dicom_image
from client.data.quarantine import QuarantineEntry, read_quarantine_report
from client.data.reasons import Reason
from client.data.site import SiteData, SplitData, load_site_data
from client.data.splits import SPLITS, Split, assign_patient_splits
from client.data.transforms import TrainingAugmentation, training_augmentation
from sic_core.errors import DataError

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
