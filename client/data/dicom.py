"""DICOM reading: bytes → one frame of intensities, or a ``DataError`` with a reason code.

The steps follow DATA.md: read (forcing files without a preamble and repairing a missing
Transfer Syntax UID; gzip input is sniffed), reject everything that is not a single-frame
image *before* decoding, decode, cast to float32 at once, apply the modality LUT, invert
MONOCHROME1, map palette colour through its LUT and reduce colour to grey unless the site
keeps colour. Scaling and resizing happen afterwards (``client.data.transforms``).

Orientation: arrays are ``[row, column]`` exactly as pydicom returns them (no transpose).
"""

from __future__ import annotations

import gzip
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from client.data.reasons import Reason
from sic_core.errors import DataError

__all__ = ["DicomOptions", "read_dicom_pixels"]

logger = logging.getLogger(__name__)

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_RT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.1"
#: SOP class prefixes of objects that carry no image to classify (SR and key objects,
#: RT plans/doses/structures, waveforms, raw data/SEG/registration, presentation states,
#: encapsulated documents, surfaces, real-world value maps).
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.9.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.67",
    "1.2.840.10008.5.1.4.1.1.68.",
    "1.2.840.10008.5.1.4.34.",
)
_NON_IMAGE_MODALITIES = frozenset(
    {"SR", "KO", "PR", "RTPLAN", "RTSTRUCT", "RTDOSE", "RTRECORD", "SEG", "REG", "ECG", "DOC"}
)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOUR_PHOTOMETRICS = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"}
)
_SUPPORTED_PHOTOMETRICS = _COLOUR_PHOTOMETRICS | {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"}
#: Element groups every real image object has (identification, patient, study, image).
_IMAGE_GROUPS = frozenset({0x0008, 0x0010, 0x0020, 0x0028})
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class DicomOptions:
    """What a site accepts from a DICOM file.

    Parameters
    ----------
    keep_colour
        Return three channels (grey images replicated) instead of one grey channel.
    frame
        Frame to take from a multi-frame file; ``None`` rejects multi-frame files.
    allowed_modalities
        Accepted ``Modality`` values; ``None`` accepts any.
    max_decoded_megabytes
        Memory guard on the declared decoded size, checked before decoding.
    """

    keep_colour: bool = False
    frame: int | None = None
    allowed_modalities: tuple[str, ...] | None = None
    max_decoded_megabytes: float = 512.0


def read_dicom_pixels(source: Path | bytes, options: DicomOptions = DicomOptions()) -> np.ndarray:
    """Decode one DICOM image into float32 intensities.

    Parameters
    ----------
    source
        A file path, or the file's bytes (already read, e.g. for hashing).
    options
        The site's acceptance rules.

    Returns
    -------
    numpy.ndarray
        float32 ``(C, rows, columns)``, C = 1 (grey) or 3 (``keep_colour``); modality LUT
        applied and MONOCHROME1 inverted, so larger means brighter on a standard display.
        Not yet scaled to [0, 1].

    Raises
    ------
    DataError
        With ``reason`` one of the ``Reason`` codes; nothing else escapes.
    """
    data = source if isinstance(source, bytes) else _read_bytes(source)
    with warnings.catch_warnings():
        # pydicom warns about every oddity of real-world files; the outcome is what counts.
        warnings.simplefilter("ignore")
        try:
            dataset, forced = _parse(data, options)
            _check_object(dataset, forced)
            frames = _check_image(dataset, options)
            pixels, photometric = _decode(dataset, options, frames)
            return _to_intensities(dataset, pixels, photometric, options)
        except DataError:
            raise
        except MemoryError:
            raise DataError("not enough memory to decode", reason=Reason.TOO_LARGE) from None
        except Exception as error:
            logger.debug("DICOM decoding failed", exc_info=True)
            raise DataError(
                f"cannot decode: {type(error).__name__}: {error}", reason=Reason.DECODE_ERROR
            ) from None


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", reason=Reason.MISSING_FILE) from None
    except OSError as error:
        raise DataError(f"cannot read: {error.strerror}", reason=Reason.DECODE_ERROR) from None


def _parse(data: bytes, options: DicomOptions) -> tuple[Dataset, bool]:
    """Parse bytes; returns the dataset and whether it needed ``force=True``."""
    if data[:2] == b"\x1f\x8b":
        data = _gunzip(data, limit=int(options.max_decoded_megabytes * 2**20))
    try:
        return pydicom.dcmread(io.BytesIO(data)), False
    except InvalidDicomError:
        pass
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as error:
        raise DataError(f"not a DICOM file ({error})", reason=Reason.NOT_DICOM) from None
    _repair_transfer_syntax(dataset)
    return dataset, True


def _gunzip(data: bytes, *, limit: int) -> bytes:
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
        try:
            inflated = stream.read(limit + 1)
        except (OSError, EOFError) as error:
            raise DataError(f"corrupt gzip stream ({error})", reason=Reason.DECODE_ERROR) from None
    if len(inflated) > limit:
        raise DataError("gzip content exceeds the memory guard", reason=Reason.TOO_LARGE)
    return inflated


def _repair_transfer_syntax(dataset: Dataset) -> None:
    """Give a file without meta information the transfer syntax it was parsed with."""
    meta = getattr(dataset, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        dataset.file_meta = meta
    if meta.get("TransferSyntaxUID"):
        return
    implicit, little = dataset.original_encoding
    if little:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRBigEndian


def _check_object(dataset: Dataset, forced: bool) -> None:
    """Reject DICOMDIRs, non-image objects and objects without pixels."""
    meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
    sop_class = str(dataset.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
    if sop_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in dataset:
        raise DataError("a DICOMDIR, not an image", reason=Reason.NOT_IMAGE)
    modality = str(dataset.get("Modality", "") or "").upper()
    non_image_sop = sop_class != _RT_IMAGE_STORAGE and sop_class.startswith(_NON_IMAGE_SOP_PREFIXES)
    if non_image_sop or modality in _NON_IMAGE_MODALITIES:
        name = UID(sop_class).name if sop_class else modality
        raise DataError(f"not an image object ({name})", reason=Reason.NOT_IMAGE)
    if not any(keyword in dataset for keyword in _PIXEL_KEYWORDS):
        # Tags, not elements: iterating a Dataset converts each raw element, which can
        # raise on the garbage a forced read of a non-DICOM file produces.
        tags = list(dataset.keys())
        if forced and not any(tag.group in _IMAGE_GROUPS for tag in tags):
            raise DataError("not a DICOM file", reason=Reason.NOT_DICOM)
        raise DataError("no Pixel Data element", reason=Reason.NO_PIXELS)


def _int_element(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    value = dataset.get(keyword)
    if value is None or value == "":
        if default is None:
            raise DataError(f"missing {keyword}", reason=Reason.BAD_GEOMETRY)
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"invalid {keyword}: {value!r}", reason=Reason.BAD_GEOMETRY) from None


def _check_image(dataset: Dataset, options: DicomOptions) -> int:
    """Check modality, geometry, frames and the memory guard; returns the frame count."""
    if options.allowed_modalities is not None:
        modality = str(dataset.get("Modality", "") or "").upper()
        if modality not in options.allowed_modalities:
            raise DataError(
                f"modality {modality or '(none)'} is not in {list(options.allowed_modalities)}",
                reason=Reason.MODALITY_NOT_ALLOWED,
            )
    rows = _int_element(dataset, "Rows")
    columns = _int_element(dataset, "Columns")
    samples = _int_element(dataset, "SamplesPerPixel", 1)
    bits = _int_element(dataset, "BitsAllocated", 16)
    frames = _int_element(dataset, "NumberOfFrames", 1) or 1
    if rows < 2 or columns < 2 or samples not in (1, 3) or bits <= 0 or frames < 0:
        raise DataError(
            f"unusable geometry: {rows}x{columns}, {samples} samples, {bits} bits",
            reason=Reason.BAD_GEOMETRY,
        )
    if frames > 1 and options.frame is None:
        raise DataError(f"{frames} frames and no frame chosen", reason=Reason.MULTIFRAME)
    if options.frame is not None and options.frame >= frames:
        raise DataError(
            f"frame {options.frame} requested, the file has {frames}", reason=Reason.MULTIFRAME
        )
    decoded_frames = 1 if options.frame is not None else frames
    megabytes = rows * columns * decoded_frames * samples * bits / 8 / 2**20
    if megabytes > options.max_decoded_megabytes:
        raise DataError(
            f"{megabytes:.0f} MB decoded exceeds the {options.max_decoded_megabytes:.0f} MB guard",
            reason=Reason.TOO_LARGE,
        )
    photometric = str(dataset.get("PhotometricInterpretation", "") or "").strip().upper()
    if photometric not in _SUPPORTED_PHOTOMETRICS:
        raise DataError(
            f"photometric interpretation {photometric or '(none)'} is not supported",
            reason=Reason.UNSUPPORTED_PHOTOMETRIC,
        )
    return frames


def _decode(dataset: Dataset, options: DicomOptions, frames: int) -> tuple[np.ndarray, str]:
    """Decode the chosen frame; colour YBR is converted to RGB by the decoder."""
    syntax = dataset.file_meta.TransferSyntaxUID
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(
            f"no decoder for transfer syntax {syntax.name}", reason=Reason.DECODE_ERROR
        ) from None
    if not decoder.is_available:
        raise DataError(
            f"decoder plugins for {syntax.name} are not installed", reason=Reason.DECODE_ERROR
        )
    index = options.frame if frames > 1 else None
    pixels, meta = decoder.as_array(dataset, index=index)
    photometric = str(meta.get("photometric_interpretation", "")).upper()
    return pixels, photometric


def _to_intensities(
    dataset: Dataset, pixels: np.ndarray, photometric: str, options: DicomOptions
) -> np.ndarray:
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, dataset)
        photometric = "RGB"
    if photometric in _COLOUR_PHOTOMETRICS:
        if pixels.shape != (rows, columns, 3):
            raise DataError(
                f"decoded colour shape {pixels.shape} != ({rows}, {columns}, 3)",
                reason=Reason.BAD_GEOMETRY,
            )
        rgb = pixels.astype(np.float32).transpose(2, 0, 1)
        grey = np.tensordot(_GREY_WEIGHTS, rgb, axes=1)[None]
        image = rgb if options.keep_colour else grey
    else:
        if pixels.shape != (rows, columns):
            raise DataError(
                f"decoded shape {pixels.shape} != ({rows}, {columns})",
                reason=Reason.BAD_GEOMETRY,
            )
        if "ModalityLUTSequence" in dataset:
            grey = apply_modality_lut(pixels, dataset).astype(np.float32)
        else:
            grey = pixels.astype(np.float32)
            slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
            if slope != 1.0 or intercept != 0.0:
                grey = grey * np.float32(slope) + np.float32(intercept)
        if photometric == "MONOCHROME1":
            # Negation is the inversion that percentile scaling turns into 1 - x.
            grey = np.negative(grey)
        image = grey[None]
        if options.keep_colour:
            image = np.repeat(image, 3, axis=0)
    if not np.isfinite(image).all():
        raise DataError("non-finite pixel values", reason=Reason.DECODE_ERROR)
    return np.ascontiguousarray(image, dtype=np.float32)
