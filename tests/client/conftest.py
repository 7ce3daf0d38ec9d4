"""Fixtures for the site-data tests: a small SynthCXR federation and a DICOM writer."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from client.config import SiteConfig, load_site_config
from client.synth import generate_synthcxr

#: Size and scale of the shared SynthCXR fixture (A 200, B 100, C 50, D 75 images).
SYNTH_SIZE = 64
SYNTH_SCALE = 0.25


def dicom_corpus() -> list[Path]:
    """Every file of pydicom-data and of pydicom's own test files (no download)."""
    roots = [Path(pydicom.__file__).parent / "data" / "test_files"]
    import data_store  # the pydicom-data package

    roots.append(Path(data_store.__file__).parent / "data")
    files = []
    for root in roots:
        files += [
            Path(path)
            for path in glob.glob(os.path.join(root, "**", "*"), recursive=True)
            if os.path.isfile(path)
        ]
    return sorted(files)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "CT",
    **elements: Any,
) -> Path:
    """Write a minimal single-frame uint16 image as DICOM (extra elements by keyword)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = "TEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small SynthCXR federation (easy preset), generated once per test session."""
    out = tmp_path_factory.mktemp("synthcxr") / "synth"
    return generate_synthcxr(out, preset="easy", size=SYNTH_SIZE, scale=SYNTH_SCALE, seed=0)


@pytest.fixture
def synth_site(synth_root: Path, tmp_path: Path) -> Callable[..., SiteConfig]:
    """``synth_site("site_a", **updates)``: that site's config with a private state folder."""

    def make(name: str, **updates: Any) -> SiteConfig:
        config = load_site_config(synth_root / name / "site.yaml")
        return config.model_copy(update={"state_dir": tmp_path / f"state_{name}", **updates})

    return make
