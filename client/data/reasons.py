"""Fixed reason codes for files a site cannot use.

Only these codes (and their counts) ever leave a site; the paths stay in the site-local
quarantine report.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason"]


class Reason(StrEnum):
    """Why a file or row was skipped (the ``reason`` of a ``DataError``)."""

    #: The file is not DICOM at all (text, another format).
    NOT_DICOM = "not_dicom"
    #: The file parsed but its pixel data could not be decoded (corrupt, truncated, codec).
    DECODE_ERROR = "decode_error"
    #: A DICOM image object without Pixel Data.
    NO_PIXELS = "no_pixels"
    #: More than one frame and the site did not pick a frame (or the frame does not exist).
    MULTIFRAME = "multiframe"
    #: A DICOM object that is not an image (SR, RT, waveform, SEG, DICOMDIR, ...).
    NOT_IMAGE = "not_image"
    #: The declared decoded size is over the site's memory guard.
    TOO_LARGE = "too_large"
    #: Rows/Columns missing or inconsistent, or a mask of another shape than its image.
    BAD_GEOMETRY = "bad_geometry"
    #: A photometric interpretation the loader cannot turn into intensities.
    UNSUPPORTED_PHOTOMETRIC = "unsupported_photometric"
    #: The DICOM Modality is not in the site's ``allowed_modalities``.
    MODALITY_NOT_ALLOWED = "modality_not_allowed"
    #: The image has no usable intensity range (every pixel the same, or not finite).
    BLANK_IMAGE = "blank_image"
    #: A row names a file that does not exist.
    MISSING_FILE = "missing_file"
    #: A row's label is not a class index or class name of the site.
    BAD_LABEL = "bad_label"
    #: A row lacks a patient id or has another malformed field.
    BAD_ROW = "bad_row"
    #: A mask file cannot be read, or its size differs from its image's.
    MASK_ERROR = "mask_error"
    #: The site's data source as a whole (labels.csv, .npz, class folders) is unusable.
    SOURCE_ERROR = "source_error"
