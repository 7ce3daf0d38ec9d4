"""The three input formats of DATA.md, each turned into records of one internal kind.

A source lists :class:`Record` s (cheap: no pixels), gives each a content digest for the
cache, and loads one record's raw image and masks on demand. Orientation everywhere:
``array[row, column]``, as pydicom and Pillow return them.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from client.config import DataFormat, SiteConfig
from client.data.cache import FileDigests, digest_parts
from client.data.dicom import DicomOptions, read_dicom_pixels
from client.data.quarantine import QuarantineEntry
from client.data.reasons import Reason
from client.data.splits import Split, parse_split
from client.data.transforms import preprocess_image
from sic_core.errors import ConfigError, DataError

__all__ = [
    "MASK_COLUMNS",
    "DataSource",
    "Record",
    "load_dicom_image",
    "open_source",
    "read_mask",
    "read_raster",
]

logger = logging.getLogger(__name__)

#: labels.csv column -> mask name. ``mask`` (DATA.md) is the lesion mask. An empty cell
#: means "this image has none of it" (an all-zero mask); a missing column means "unknown".
MASK_COLUMNS: Mapping[str, str] = {
    "mask": "lesion",
    "marker_mask": "marker",
    "distractor_mask": "distractor",
}
_REQUIRED_COLUMNS = ("file", "label", "patient_id")
_RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Record:
    """One image of a site before decoding.

    Attributes
    ----------
    key
        Site-local identifier: the path as written in labels.csv, ``class/file`` for the
        folder format, ``split/index`` for MedMNIST. Never leaves the site.
    label
        Class index.
    patient_id
        Site-local patient pseudonym.
    split
        The split the data declares, or ``None`` to assign one by patient.
    path
        The file holding the image (DICOM, raster, or the MedMNIST archive); a string,
        because sites list thousands of files and pathlib costs more than decoding a hit.
    masks
        Declared masks: name -> file, or ``None`` for a declared empty mask.
    metadata
        Extra labels.csv columns.
    index
        Row in the MedMNIST arrays of ``split``.
    """

    key: str
    label: int
    patient_id: str
    split: Split | None
    path: str
    masks: Mapping[str, str | None] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    index: int | None = None


class DataSource(Protocol):
    """What the site pipeline needs from a format."""

    def records(self) -> tuple[list[Record], list[QuarantineEntry]]:
        """All usable rows, and the rows rejected before any file is opened."""

    def digest(self, record: Record, digests: FileDigests) -> str:
        """Content digest of the record's image and masks (raises ``DataError``)."""

    def load(self, record: Record) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Raw float32 ``(C, H, W)`` image and uint8 ``(1, H, W)`` masks (raises ``DataError``)."""


def load_dicom_image(
    path: str | Path,
    size: int,
    *,
    percentiles: tuple[float, float] = (0.5, 99.5),
    options: DicomOptions | None = None,
) -> np.ndarray:
    """Load one DICOM file as a preprocessed grey image.

    Parameters
    ----------
    path
        The DICOM file (a gzip-compressed file is accepted too).
    size
        Output side length in pixels.
    percentiles
        Intensity window mapped to [0, 1].
    options
        Acceptance rules (frame, modalities, memory guard; default: accept any single-frame
        image); ``keep_colour`` gives 3 channels.

    Returns
    -------
    numpy.ndarray
        float32 ``(1, size, size)`` in [0, 1] (``(3, size, size)`` with ``keep_colour``),
        ``[row, column]`` as in the file, padded to a square and area-resized.

    Raises
    ------
    DataError
        For anything else, with ``reason`` a ``Reason`` code.
    """
    image = read_dicom_pixels(Path(path), options or DicomOptions())
    return preprocess_image(image, size, percentiles)[0]


def open_source(config: SiteConfig) -> DataSource:
    """The reader for the site's ``data.format``.

    Raises
    ------
    DataError
        ``source_error`` when the labels file, archive or folder is unusable as a whole.
    """
    if config.data.format is DataFormat.DICOM:
        return DicomSource(config)
    if config.data.format is DataFormat.MEDMNIST:
        return MedmnistSource(config)
    return FolderSource(config)


def _required(path: Path | None, name: str) -> Path:
    """The format's path setting (``DataConfig`` validation guarantees it for loaded files)."""
    if path is None:
        raise ConfigError(f"data.{name} is required for this data.format")
    return path


def _parse_label(text: str, class_names: list[str]) -> int:
    value = text.strip()
    if value in class_names:
        return class_names.index(value)
    try:
        label = int(value)
    except ValueError:
        raise DataError(
            f"label {value!r} is neither a class index nor one of {class_names}",
            reason=Reason.BAD_LABEL,
        ) from None
    if not 0 <= label < len(class_names):
        raise DataError(
            f"label {label} is outside 0..{len(class_names) - 1}", reason=Reason.BAD_LABEL
        )
    return label


def read_mask(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Read a mask image as uint8 ``(1, H, W)`` in {0, 1} (any nonzero pixel is inside).

    Raises
    ------
    DataError
        ``mask_error`` when the file is unreadable or its size differs from ``shape``.
    """
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except FileNotFoundError:
        raise DataError("mask file not found", reason=Reason.MASK_ERROR) from None
    except Exception as error:
        raise DataError(f"cannot read mask: {error}", reason=Reason.MASK_ERROR) from None
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.shape != shape:
        raise DataError(
            f"mask size {array.shape} differs from the image's {shape}", reason=Reason.MASK_ERROR
        )
    return (array > 0).astype(np.uint8)[None]


def _load_masks(record: Record, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    masks = {}
    for name, path in record.masks.items():
        masks[name] = np.zeros((1, *shape), np.uint8) if path is None else read_mask(path, shape)
    return masks


def _file_digest(record: Record, digests: FileDigests) -> str:
    """Digest of the image file and every declared mask file."""
    try:
        parts = [digests.digest(record.path)]
    except FileNotFoundError:
        raise DataError("file not found", reason=Reason.MISSING_FILE) from None
    except OSError as error:
        raise DataError(f"cannot read: {error.strerror}", reason=Reason.DECODE_ERROR) from None
    for name in sorted(record.masks):
        path = record.masks[name]
        if path is None:
            parts += [name, "empty"]
            continue
        try:
            parts += [name, digests.digest(path)]
        except OSError:
            raise DataError(f"cannot read the {name} mask", reason=Reason.MASK_ERROR) from None
    return digest_parts(*parts)


class DicomSource:
    """``labels.csv`` + DICOM files (paths relative to ``data.root``, else the CSV's folder)."""

    def __init__(self, config: SiteConfig) -> None:
        data = config.data
        self.labels_csv = _required(data.labels_csv, "labels_csv")
        self.base = os.fspath(data.root if data.root is not None else self.labels_csv.parent)
        self.class_names = list(data.class_names)
        self.options = DicomOptions(
            keep_colour=data.keep_colour,
            frame=data.frame,
            allowed_modalities=(
                tuple(data.allowed_modalities) if data.allowed_modalities is not None else None
            ),
            max_decoded_megabytes=data.max_decoded_megabytes,
        )

    def records(self) -> tuple[list[Record], list[QuarantineEntry]]:
        try:
            with self.labels_csv.open(newline="", encoding="utf-8-sig") as stream:
                reader = csv.DictReader(stream)
                rows = list(reader)
                columns = list(reader.fieldnames or [])
        except OSError as error:
            raise DataError(
                f"{self.labels_csv}: cannot read the labels file ({error.strerror})",
                reason=Reason.SOURCE_ERROR,
            ) from None
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(
                f"{self.labels_csv}: not a readable CSV file ({error})", reason=Reason.SOURCE_ERROR
            ) from None
        missing = [column for column in _REQUIRED_COLUMNS if column not in columns]
        if missing:
            raise DataError(
                f"{self.labels_csv}: the header needs the columns {list(_REQUIRED_COLUMNS)}; "
                f"missing: {missing} (found: {columns})",
                reason=Reason.SOURCE_ERROR,
            )
        if not rows:
            raise DataError(
                f"{self.labels_csv}: no rows below the header", reason=Reason.SOURCE_ERROR
            )
        mask_columns = {
            column: MASK_COLUMNS[column] for column in columns if column in MASK_COLUMNS
        }
        known = {*_REQUIRED_COLUMNS, "split", *mask_columns}
        records, rejected, seen = [], [], set()
        for line, row in enumerate(rows, start=2):
            key = (row.get("file") or "").strip()
            try:
                records.append(self._record(row, key, line, mask_columns, known, seen))
            except DataError as error:
                rejected.append(
                    QuarantineEntry(key or f"labels.csv line {line}", error.reason, str(error))
                )
        return records, rejected

    def _record(
        self,
        row: Mapping[str, str | None],
        key: str,
        line: int,
        mask_columns: Mapping[str, str],
        known: set[str],
        seen: set[str],
    ) -> Record:
        if not key:
            raise DataError(f"line {line}: empty file name", reason=Reason.BAD_ROW)
        if key in seen:
            raise DataError(f"line {line}: file listed twice", reason=Reason.BAD_ROW)
        seen.add(key)
        patient = (row.get("patient_id") or "").strip()
        if not patient:
            raise DataError(f"line {line}: empty patient_id", reason=Reason.BAD_ROW)
        label = _parse_label(row.get("label") or "", self.class_names)
        split = None
        if "split" in row:
            try:
                split = parse_split(row.get("split") or "")
            except ValueError as error:
                raise DataError(f"line {line}: {error}", reason=Reason.BAD_ROW) from None
        masks = {
            name: os.path.join(self.base, value.strip())
            if (value := row.get(column) or "").strip()
            else None
            for column, name in mask_columns.items()
        }
        metadata = {
            column: (value or "") for column, value in row.items() if column not in known and column
        }
        return Record(key, label, patient, split, os.path.join(self.base, key), masks, metadata)

    def digest(self, record: Record, digests: FileDigests) -> str:
        return _file_digest(record, digests)

    def load(self, record: Record) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        image = read_dicom_pixels(Path(record.path), self.options)
        return image, _load_masks(record, image.shape[1:])


class FolderSource:
    """``root/<class_name>/*.png|jpg`` with optional ``root/masks/<class_name>/<stem>.png``."""

    def __init__(self, config: SiteConfig) -> None:
        self.root = _required(config.data.root, "root")
        self.class_names = list(config.data.class_names)
        self.keep_colour = config.data.keep_colour
        self.max_pixels = config.data.max_decoded_megabytes * 2**20 / 4
        pattern = config.data.patient_id_pattern
        self.patient_pattern = re.compile(pattern) if pattern else None

    def records(self) -> tuple[list[Record], list[QuarantineEntry]]:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder", reason=Reason.SOURCE_ERROR)
        present = {path.name for path in self.root.iterdir() if path.is_dir()}
        missing = [name for name in self.class_names if name not in present]
        if len(missing) == len(self.class_names):
            raise DataError(
                f"{self.root}: expected one sub-folder per class {self.class_names}",
                reason=Reason.SOURCE_ERROR,
            )
        if missing:
            logger.warning("Class folders missing under the data root: %s", missing)
        records, rejected = [], []
        for label, class_name in enumerate(self.class_names):
            folder = self.root / class_name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in _RASTER_SUFFIXES or not path.is_file():
                    continue
                key = f"{class_name}/{path.name}"
                try:
                    patient = self._patient_id(path.name, key)
                except DataError as error:
                    rejected.append(QuarantineEntry(key, error.reason, str(error)))
                    continue
                mask = self.root / "masks" / class_name / f"{path.stem}.png"
                masks = {"lesion": str(mask)} if mask.is_file() else {}
                records.append(Record(key, label, patient, None, str(path), masks))
        return records, rejected

    def _patient_id(self, file_name: str, key: str) -> str:
        if self.patient_pattern is None:
            return key
        match = self.patient_pattern.search(file_name)
        if match is None or not match.group(1):
            raise DataError(
                "file name does not match data.patient_id_pattern", reason=Reason.BAD_ROW
            )
        return match.group(1)

    def digest(self, record: Record, digests: FileDigests) -> str:
        return _file_digest(record, digests)

    def load(self, record: Record) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        image = read_raster(record.path, keep_colour=self.keep_colour, max_pixels=self.max_pixels)
        return image, _load_masks(record, image.shape[1:])


def read_raster(path: str | Path, *, keep_colour: bool, max_pixels: float) -> np.ndarray:
    """Read a PNG/JPEG/TIFF as float32 ``(C, H, W)`` (C = 3 if ``keep_colour`` else 1).

    Raises
    ------
    DataError
        ``too_large``, or ``decode_error`` (also for files that are not images).
    """
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise DataError(
                    f"{width}x{height} pixels exceed the memory guard", reason=Reason.TOO_LARGE
                )
            image = ImageOps.exif_transpose(opened)
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(image, dtype=np.float32)[None]
            else:
                rgb = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
                grey = image.mode in ("1", "L", "LA")
                if keep_colour:
                    array = rgb
                elif grey:
                    array = rgb[:1]
                else:
                    array = np.tensordot(_GREY_WEIGHTS, rgb, axes=1)[None]
    except FileNotFoundError:
        raise DataError("file not found", reason=Reason.MISSING_FILE) from None
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("not an image file", reason=Reason.DECODE_ERROR) from None
    except Exception as error:
        raise DataError(f"cannot decode: {error}", reason=Reason.DECODE_ERROR) from None
    if keep_colour and array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    return np.ascontiguousarray(array, dtype=np.float32)


class MedmnistSource:
    """A MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``); its splits are kept."""

    def __init__(self, config: SiteConfig) -> None:
        self.path = _required(config.data.npz, "npz")
        self.class_names = list(config.data.class_names)
        self.keep_colour = config.data.keep_colour
        self._arrays: dict[str, np.ndarray] | None = None
        self._archive_digest: str | None = None

    def _load_arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return self._arrays
        keys = [f"{split}_{kind}" for split in Split for kind in ("images", "labels")]
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                missing = [key for key in keys if key not in archive.files]
                if missing:
                    raise DataError(
                        f"{self.path}: not a MedMNIST archive, missing {missing}",
                        reason=Reason.SOURCE_ERROR,
                    )
                arrays = {key: archive[key] for key in keys}
        except (OSError, ValueError) as error:
            raise DataError(
                f"{self.path}: cannot read the archive ({error})", reason=Reason.SOURCE_ERROR
            ) from None
        for split in Split:
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
                raise DataError(
                    f"{self.path}: {split}_images has shape {images.shape}; expected "
                    "(N, H, W) or (N, H, W, 3)",
                    reason=Reason.SOURCE_ERROR,
                )
            if labels.ndim == 2 and labels.shape[1] > 1:
                raise DataError(
                    f"{self.path}: multi-label archives ({labels.shape[1]} labels) are not "
                    "supported; give one label per image",
                    reason=Reason.SOURCE_ERROR,
                )
            if labels.reshape(-1).shape[0] != images.shape[0]:
                raise DataError(
                    f"{self.path}: {split} has {images.shape[0]} images but {labels.size} labels",
                    reason=Reason.SOURCE_ERROR,
                )
        self._arrays = arrays
        return arrays

    def records(self) -> tuple[list[Record], list[QuarantineEntry]]:
        arrays = self._load_arrays()
        records, rejected = [], []
        for split in Split:
            for index, value in enumerate(arrays[f"{split}_labels"].reshape(-1).tolist()):
                key = f"{split}/{index}"
                try:
                    label = _parse_label(str(value), self.class_names)
                except DataError as error:
                    rejected.append(QuarantineEntry(key, error.reason, str(error)))
                    continue
                records.append(
                    Record(key, label, f"{split}-{index}", split, str(self.path), index=index)
                )
        return records, rejected

    def digest(self, record: Record, digests: FileDigests) -> str:
        if self._archive_digest is None:
            try:
                self._archive_digest = digests.digest(self.path)
            except OSError as error:
                raise DataError(
                    f"cannot read the archive: {error}", reason=Reason.SOURCE_ERROR
                ) from None
        return digest_parts(self._archive_digest, str(record.split), str(record.index))

    def load(self, record: Record) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        pixels = self._load_arrays()[f"{record.split}_images"][record.index]
        image = pixels.astype(np.float32)
        if image.ndim == 2:
            image = image[None]
            if self.keep_colour:
                image = np.repeat(image, 3, axis=0)
        else:
            image = image.transpose(2, 0, 1)
            if not self.keep_colour:
                image = np.tensordot(_GREY_WEIGHTS, image, axes=1)[None]
        return np.ascontiguousarray(image), {}
