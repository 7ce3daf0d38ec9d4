"""Byte-reproducible output of SynthCXR: DICOM files, mask PNGs, CSV, YAML, JSON, npz."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from client.synth.params import SiteSpec
from client.synth.render import Rendered

__all__ = ["DicomTemplate", "write_csv", "write_json", "write_mask", "write_npz", "write_site_yaml"]

_SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
}
_STUDY_DATE = "20240102"
_STUDY_TIME = "093000"
#: Fixed zip entry timestamp, so that the same arrays give the same bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _uid(seed: int, site: str, index: int, kind: str) -> str:
    # generate_uid joins its sources without a separator: add one, so keys cannot collide.
    uid = generate_uid(entropy_srcs=[f"SynthCXR|{seed}|{site}|{index}|{kind}"])
    if len(uid) != _UID_LENGTH:
        raise RuntimeError(f"unexpected UID length {len(uid)}")
    return uid


def _decimal(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    return f"{value:.6g}"


_UID_LENGTH = 64
#: Per-image elements, each written with a fixed value length so that every file of a site
#: is the site's template with these values (and the pixels) spliced in.
_VARYING = {
    "MediaStorageSOPInstanceUID": 0x00020003,
    "SOPInstanceUID": 0x00080018,
    "AccessionNumber": 0x00080050,
    "PatientName": 0x00100010,
    "PatientID": 0x00100020,
    "PatientBirthDate": 0x00100030,
    "PatientSex": 0x00100040,
    "PatientAge": 0x00101010,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "BurnedInAnnotation": 0x00280301,
}


class DicomTemplate:
    """Writes one site's DICOM files fast: pydicom encodes the header once per site.

    pydicom needs milliseconds per file to build and encode ~60 elements; here it encodes
    a template, and each image only splices its fixed-length values (UIDs, patient id,
    dates, burned-in flag) and pixel bytes into a copy. Reading any file back with pydicom
    gives exactly the dataset it would have written itself.

    Parameters
    ----------
    site
        Modality, photometric interpretation, bit depth, vendor and field of view.
    seed
        Key of the deterministic UIDs.
    size
        Rows and columns.
    patient_id_length
        Length of every patient id of the site.
    """

    def __init__(self, site: SiteSpec, *, seed: int, size: int, patient_id_length: int) -> None:
        self.site = site
        self.seed = seed
        self.size = size
        placeholder = self._values(
            index=0, patient_id="0" * patient_id_length, sex="F", age=0, marker=True
        )
        dataset = self._dataset(placeholder)
        stream = io.BytesIO()
        pydicom.dcmwrite(stream, dataset, enforce_file_format=True)
        encoded = stream.getvalue()
        pixel_bytes = size * size * 2
        self._header = bytearray(encoded[:-pixel_bytes])
        parsed = pydicom.dcmread(io.BytesIO(encoded))
        self._slots: dict[str, tuple[int, int]] = {}
        for keyword, tag in _VARYING.items():
            holder = parsed.file_meta if tag >> 16 == 0x0002 else parsed
            element = holder.get_item(tag)
            self._slots[keyword] = (element.value_tell, element.length)
        pixel = parsed.get_item(0x7FE00010)
        if pixel.value_tell != len(self._header) or pixel.length != pixel_bytes:
            raise RuntimeError("the DICOM template does not end with its pixel data")

    def _values(
        self, *, index: int, patient_id: str, sex: str, age: int, marker: bool
    ) -> dict[str, str]:
        sop = _uid(self.seed, self.site.name, index, "image")
        return {
            "MediaStorageSOPInstanceUID": sop,
            "SOPInstanceUID": sop,
            "AccessionNumber": f"{index:08d}",
            "PatientName": f"SYNTHETIC^{patient_id}",
            "PatientID": patient_id,
            "PatientBirthDate": f"{2024 - age:04d}0101",
            "PatientSex": sex,
            "PatientAge": f"{age:03d}Y",
            "StudyInstanceUID": _uid(self.seed, self.site.name, index, "study"),
            "SeriesInstanceUID": _uid(self.seed, self.site.name, index, "series"),
            # Same length for both answers (CS trailing spaces are padding).
            "BurnedInAnnotation": "YES" if marker else "NO ",
        }

    def _dataset(self, values: dict[str, str]) -> Dataset:
        site = self.site
        sop_class = _SOP_CLASSES[site.modality]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = values["MediaStorageSOPInstanceUID"]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "PRIMARY"]
        ds.SOPClassUID = sop_class
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = _STUDY_DATE
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = _STUDY_TIME
        ds.Modality = site.modality
        if site.modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Manufacturer = site.manufacturer
        ds.ManufacturerModelName = site.model_name
        ds.InstitutionName = site.institution
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CHEST PA (synthetic)"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "Synthetic data: no real person"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.PatientOrientation = ["L", "F"]
        ds.ImageComments = "Synthetic image generated by SynthCXR; not a patient, not for diagnosis"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = site.photometric
        ds.Rows = self.size
        ds.Columns = self.size
        spacing = _decimal(site.fov_mm / self.size)
        ds.PixelSpacing = [spacing, spacing]
        ds.ImagerPixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = site.bits_stored
        ds.HighBit = site.bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PresentationLUTShape = "INVERSE" if site.photometric == "MONOCHROME1" else "IDENTITY"
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        top = 2**site.bits_stored - 1
        ds.WindowCenter = _decimal(top / 2)
        ds.WindowWidth = _decimal(top)
        for keyword, value in values.items():
            if not keyword.startswith("MediaStorage"):
                setattr(ds, keyword, value)
        ds.PixelData = np.zeros((self.size, self.size), "<u2").tobytes()
        return ds

    def write(
        self, path: Path, rendered: Rendered, *, index: int, patient_id: str, marker: bool
    ) -> None:
        """Write one image.

        Parameters
        ----------
        path
            Output file.
        rendered
            The image; its ``stored`` pixels are written as they are.
        index
            Image index within the site (keys the UIDs).
        patient_id
            Pseudonymous patient id (same length as the template's).
        marker
            Whether text is burned into the pixels (``BurnedInAnnotation``).
        """
        if rendered.stored.shape != (self.size, self.size):
            raise ValueError(f"expected a {self.size}x{self.size} image")
        values = self._values(
            index=index, patient_id=patient_id, sex=rendered.sex, age=rendered.age, marker=marker
        )
        header = bytearray(self._header)
        for keyword, (offset, length) in self._slots.items():
            padding = b"\0" if keyword.endswith("UID") else b" "
            encoded = values[keyword].encode("ascii")
            encoded += padding * (length - len(encoded))
            if len(encoded) != length:
                raise ValueError(f"{keyword} {values[keyword]!r} does not fit {length} bytes")
            header[offset : offset + length] = encoded
        with path.open("wb") as stream:
            stream.write(header)
            stream.write(rendered.stored.astype("<u2").tobytes())


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Write a bool ``(H, W)`` mask as an 8-bit PNG (0 / 255)."""
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path, format="PNG")


def write_csv(path: Path, rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> None:
    """Write rows with a fixed column order and Unix line endings."""
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, payload: Any) -> None:
    """Write JSON with sorted keys (reproducible bytes)."""
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_site_yaml(path: Path, config: Mapping[str, Any], comment: str) -> None:
    """Write a site config with a leading comment."""
    text = yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)
    path.write_text(f"# {comment}\n{text}", encoding="utf-8")


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` readable by ``numpy.load``, with fixed timestamps.

    ``numpy.savez`` stamps each member with the current time, so two runs would differ.
    """
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            with archive.open(info, "w", force_zip64=True) as stream:
                np.lib.format.write_array(
                    stream, np.ascontiguousarray(arrays[name]), allow_pickle=False
                )
