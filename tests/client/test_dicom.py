"""The DICOM loader against every real test file, and its contract on hand-made files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from client.data import DataError, DicomOptions, Reason, load_dicom_image
from tests.client.conftest import dicom_corpus, write_dicom

CORPUS = dicom_corpus()
SIZE = 48


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def test_the_corpus_is_there() -> None:
    names = {path.name for path in CORPUS}
    assert len(CORPUS) > 200
    assert {"RG1_UNCI.dcm", "bad_sequence.dcm", "CT_small.dcm", "rtplan.dcm"} <= names


@pytest.mark.parametrize(
    "options",
    [DicomOptions(), DicomOptions(frame=0, keep_colour=True)],
    ids=["defaults", "frame0-colour"],
)
@pytest.mark.parametrize("path", CORPUS, ids=_name)
def test_every_file_loads_or_raises_a_data_error(path: Path, options: DicomOptions) -> None:
    try:
        image = load_dicom_image(path, SIZE, options=options)
    except DataError as error:
        assert error.reason in set(Reason), error.reason
        assert str(error)
        return
    channels = 3 if options.keep_colour else 1
    assert image.shape == (channels, SIZE, SIZE)
    assert image.dtype == np.float32
    assert np.isfinite(image).all()
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image.max() > image.min()


@pytest.mark.parametrize(
    "name",
    [
        "bad_sequence.dcm",  # JPEG Lossless with a malformed sequence
        "JPEG-LL.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "JPEG2000.dcm",
        "MR_small_jp2klossless.dcm",
        "693_J2KR.dcm",
        "RG1_J2KR.dcm",
        "RG1_J2KI.dcm",
        "US1_J2KR.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "OT-PAL-8-face.dcm",  # no preamble, no transfer syntax, palette colour
    ],
)
def test_compressed_and_odd_files_decode(name: str) -> None:
    image = load_dicom_image(get_testdata_file(name), SIZE)
    assert image.shape == (1, SIZE, SIZE)
    assert image.std() > 0.05


def test_multiframe_files_need_a_frame() -> None:
    path = get_testdata_file("emri_small_jpeg_2k_lossless.dcm")
    with pytest.raises(DataError) as raised:
        load_dicom_image(path, SIZE)
    assert raised.value.reason == Reason.MULTIFRAME
    first = load_dicom_image(path, SIZE, options=DicomOptions(frame=0))
    last = load_dicom_image(path, SIZE, options=DicomOptions(frame=9))
    assert not np.allclose(first, last)
    with pytest.raises(DataError) as raised:
        load_dicom_image(path, SIZE, options=DicomOptions(frame=10))
    assert raised.value.reason == Reason.MULTIFRAME


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan.dcm", Reason.NOT_IMAGE),
        ("rtdose_1frame.dcm", Reason.NOT_IMAGE),
        ("test-SR.dcm", Reason.NOT_IMAGE),
        ("waveform_ecg.dcm", Reason.NOT_IMAGE),
        ("liver_1frame.dcm", Reason.NOT_IMAGE),
        ("emri_small.dcm", Reason.MULTIFRAME),
        ("MR_truncated.dcm", Reason.DECODE_ERROR),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", Reason.NO_PIXELS),
        ("JPEG2000-embedded-sequence-delimiter.dcm", Reason.DECODE_ERROR),
        ("README.txt", Reason.NOT_DICOM),
    ],
)
def test_known_bad_files_give_their_reason(name: str, reason: Reason) -> None:
    path = next(path for path in CORPUS if path.name == name)
    with pytest.raises(DataError) as raised:
        load_dicom_image(path, SIZE)
    assert raised.value.reason == reason


def test_a_dicomdir_is_not_an_image() -> None:
    path = next(path for path in CORPUS if path.name == "DICOMDIR")
    with pytest.raises(DataError) as raised:
        load_dicom_image(path, SIZE)
    assert raised.value.reason == Reason.NOT_IMAGE


def test_lossless_twins_give_the_same_image() -> None:
    uncompressed = load_dicom_image(get_testdata_file("RG1_UNCI.dcm"), 128)
    lossless = load_dicom_image(get_testdata_file("RG1_J2KR.dcm"), 128)
    lossless_source = load_dicom_image(get_testdata_file("RG1_UNCR.dcm"), 128)
    # _J2KR is bit-exact to _UNCR; _UNCI differs from them by a few raw grey levels.
    np.testing.assert_array_equal(lossless, lossless_source)
    assert np.abs(uncompressed - lossless).max() < 0.01
    assert np.corrcoef(uncompressed.ravel(), lossless.ravel())[0, 1] > 0.999


def test_big_endian_and_gzip_files_match_their_little_endian_twin(tmp_path: Path) -> None:
    little = load_dicom_image(get_testdata_file("MR_small.dcm"), SIZE)
    big = load_dicom_image(get_testdata_file("MR_small_bigendian.dcm"), SIZE)
    np.testing.assert_allclose(big, little, atol=1e-6)
    zipped = tmp_path / "MR_small.dcm.gz"
    zipped.write_bytes(gzip.compress(Path(get_testdata_file("MR_small.dcm")).read_bytes()))
    np.testing.assert_allclose(load_dicom_image(zipped, SIZE), little, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    rows = np.arange(64, dtype=np.float64)[:, None]
    pattern = (rows * 40 + np.arange(64)[None, :] * 3).astype(np.uint16)
    normal = write_dicom(tmp_path / "m2.dcm", pattern, photometric="MONOCHROME2")
    inverted = write_dicom(tmp_path / "m1.dcm", pattern.max() - pattern, photometric="MONOCHROME1")
    as_m2 = load_dicom_image(normal, 32)
    as_m1 = load_dicom_image(inverted, 32)
    np.testing.assert_allclose(as_m1, as_m2, atol=1e-5)
    # Stored values increase downwards in m1.dcm's inverse, so the image gets darker.
    assert as_m1[0, 0].mean() < as_m1[0, -1].mean()


def test_orientation_is_rows_then_columns_without_transpose(tmp_path: Path) -> None:
    pixels = np.full((40, 80), 100, np.uint16)
    pixels[0:10, 0:20] = 4000  # a bright block at the top left, wider than tall
    image = load_dicom_image(write_dicom(tmp_path / "o.dcm", pixels), 40)[0]
    # Padded to 80x80 (20 rows above and below), then halved: block at rows 10-15, cols 0-10.
    bright = np.argwhere(image > 0.5)
    assert bright[:, 0].min() == 10 and bright[:, 0].max() == 14
    assert bright[:, 1].min() == 0 and bright[:, 1].max() == 9


def test_rescale_slope_sign_is_applied(tmp_path: Path) -> None:
    pattern = np.tile(np.arange(32, dtype=np.uint16) * 50, (32, 1))
    plain = load_dicom_image(write_dicom(tmp_path / "a.dcm", pattern), 32)
    negated = load_dicom_image(
        write_dicom(tmp_path / "b.dcm", pattern, RescaleSlope="-1", RescaleIntercept="0"), 32
    )
    np.testing.assert_allclose(negated, 1.0 - plain, atol=1e-5)


def test_modality_guard_memory_guard_and_blank_images(tmp_path: Path) -> None:
    ct = get_testdata_file("CT_small.dcm")
    with pytest.raises(DataError) as raised:
        load_dicom_image(ct, SIZE, options=DicomOptions(allowed_modalities=("CR", "DX")))
    assert raised.value.reason == Reason.MODALITY_NOT_ALLOWED
    assert load_dicom_image(ct, SIZE, options=DicomOptions(allowed_modalities=("CT",))).any()
    with pytest.raises(DataError) as raised:
        load_dicom_image(ct, SIZE, options=DicomOptions(max_decoded_megabytes=0.01))
    assert raised.value.reason == Reason.TOO_LARGE
    flat = write_dicom(tmp_path / "flat.dcm", np.full((16, 16), 7, np.uint16))
    with pytest.raises(DataError) as raised:
        load_dicom_image(flat, SIZE)
    assert raised.value.reason == Reason.BLANK_IMAGE


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as raised:
        load_dicom_image(tmp_path / "absent.dcm", SIZE)
    assert raised.value.reason == Reason.MISSING_FILE
    odd = write_dicom(tmp_path / "hsv.dcm", np.arange(256, dtype=np.uint16).reshape(16, 16))
    import pydicom

    dataset = pydicom.dcmread(odd)
    dataset.PhotometricInterpretation = "HSV"
    dataset.save_as(odd)
    with pytest.raises(DataError) as raised:
        load_dicom_image(odd, SIZE)
    assert raised.value.reason == Reason.UNSUPPORTED_PHOTOMETRIC
