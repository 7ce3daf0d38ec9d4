"""The site pipeline: cache, quarantine, the three formats, parallel decoding."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from client.config import SiteConfig, load_site_config
from client.data import DataError, Reason, load_site_data
from tests.client.conftest import SYNTH_SIZE, write_dicom

SPLIT_NAMES = ("train", "val", "test")


def _same(a: object, b: object) -> None:
    for name in SPLIT_NAMES:
        left, right = a.split(name), b.split(name)
        assert torch.equal(left.images, right.images)
        assert torch.equal(left.labels, right.labels)
        assert left.patient_ids == right.patient_ids and left.files == right.files
        assert left.masks.keys() == right.masks.keys()
        for mask in left.masks:
            assert torch.equal(left.masks[mask], right.masks[mask])
            assert torch.equal(left.has_mask[mask], right.has_mask[mask])


def _count(data: object) -> int:
    return sum(len(data.split(name)) for name in SPLIT_NAMES)


def test_site_data_has_the_contracted_shapes(synth_site: Callable[..., SiteConfig]) -> None:
    data = load_site_data(synth_site("site_b"), workers=1)
    assert data.num_classes == 2 and data.class_names == ["normal", "nodule"]
    train = data.split("train")
    assert train.images.dtype == torch.float32 and train.images.shape[1:] == (1, 64, 64)
    assert train.images.min() >= 0 and train.images.max() <= 1
    assert train.labels.dtype == torch.int64 and train.labels.shape == (len(train),)
    assert set(train.masks) == {"lesion", "marker", "distractor"}
    for name, mask in train.masks.items():
        assert mask.dtype == torch.uint8 and mask.shape == (len(train), 1, 64, 64)
        assert train.has_mask[name].all()  # SynthCXR declares every mask, empty or not
    has_lesion = train.masks["lesion"].flatten(1).any(1)
    assert torch.equal(has_lesion, train.labels == 1)
    assert data.counts()["train"] == {
        "normal": int((train.labels == 0).sum()),
        "nodule": int((train.labels == 1).sum()),
    }
    assert data.quarantine_counts == {} and data.problems() == []
    with pytest.raises(KeyError):
        data.split("validation")


def test_masks_stay_on_the_lesions_through_decoding_and_resizing(
    synth_site: Callable[..., SiteConfig],
) -> None:
    config = synth_site("site_a")
    resized = config.model_copy(update={"data": config.data.model_copy(update={"image_size": 48})})
    split = load_site_data(resized, workers=1).split("train")
    positive = split.labels == 1
    lesion = split.masks["lesion"][positive].bool()
    images = split.images[positive]
    assert lesion.flatten(1).any(1).all()  # no lesion mask vanished in the resize
    ring = torch.nn.functional.max_pool2d(lesion.float(), 5, stride=1, padding=2).bool() & ~lesion
    inside = (images * lesion).flatten(1).sum(1) / lesion.flatten(1).sum(1)
    around = (images * ring).flatten(1).sum(1) / ring.flatten(1).sum(1)
    assert (inside > around + 0.03).all()  # every mask sits on its bright disc
    assert not split.masks["lesion"][~positive].any()


def test_the_cache_is_hit_on_a_second_load(
    synth_site: Callable[..., SiteConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = synth_site("site_c")
    first = load_site_data(config, workers=1)
    total = _count(first)
    assert (first.decoded, first.cached) == (total, 0)

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr("client.data.loaders.read_dicom_pixels", no_decoding)
    second = load_site_data(config, workers=1)
    assert (second.decoded, second.cached) == (0, total)
    _same(first, second)


def test_a_preprocessing_change_invalidates_the_cache(
    synth_site: Callable[..., SiteConfig],
) -> None:
    config = synth_site("site_c")
    first = load_site_data(config, workers=1)
    total = _count(first)
    window = config.preprocessing.model_copy(update={"percentiles": (5.0, 95.0)})
    changed = load_site_data(config.model_copy(update={"preprocessing": window}), workers=1)
    assert changed.decoded == total
    assert not torch.equal(changed.split("train").images, first.split("train").images)
    smaller = config.data.model_copy(update={"image_size": 32})
    resized = load_site_data(config.model_copy(update={"data": smaller}), workers=1)
    assert resized.decoded == total and resized.split("train").images.shape[-1] == 32
    # Augmentation settings are applied per batch, not cached: they must not invalidate.
    augment = config.preprocessing.model_copy(update={"rotate_degrees": 20.0})
    again = load_site_data(config.model_copy(update={"preprocessing": augment}), workers=1)
    assert again.decoded == 0


def test_a_changed_file_is_decoded_again_alone(synth_root: Path, tmp_path: Path) -> None:
    site = shutil.copytree(synth_root / "site_c", tmp_path / "site_c")
    config = load_site_config(site / "site.yaml")
    first = load_site_data(config, workers=1)
    target = site / first.split("train").files[0]
    dataset = pydicom.dcmread(target)
    pixels = dataset.pixel_array.copy()
    pixels[24:40, 24:40] = pixels.max()
    dataset.PixelData = pixels.tobytes()
    dataset.save_as(target)
    later = target.stat().st_mtime_ns + 5_000_000_000
    os.utime(target, ns=(later, later))
    second = load_site_data(config, workers=1)
    assert second.decoded == 1 and second.cached == _count(first) - 1
    changed = second.split("train").images[0]
    assert not torch.equal(changed, first.split("train").images[0])


def test_parallel_decoding_gives_the_same_tensors(
    synth_site: Callable[..., SiteConfig], tmp_path: Path
) -> None:
    serial = load_site_data(synth_site("site_a"), workers=1)
    config = synth_site("site_a").model_copy(update={"state_dir": tmp_path / "parallel"})
    parallel = load_site_data(config, workers=2)
    assert parallel.decoded == _count(serial) >= 64
    _same(serial, parallel)


def _dicom_site(tmp_path: Path, rows: list[dict[str, str]]) -> SiteConfig:
    columns = ["file", "label", "patient_id", "mask"]
    with (tmp_path / "labels.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return SiteConfig.model_validate(
        {
            "name": "messy",
            "state_dir": tmp_path / "state",
            "data": {
                "format": "dicom",
                "labels_csv": tmp_path / "labels.csv",
                "class_names": ["normal", "nodule"],
                "image_size": 16,
            },
        }
    )


def test_bad_files_are_skipped_counted_and_listed_without_leaking_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for index in range(12):
        name = f"good_{index}.dcm"
        write_dicom(tmp_path / name, rng.integers(0, 3000, (20, 20)).astype(np.uint16))
        rows.append(
            {"file": name, "label": str(index % 2), "patient_id": f"PAT{index}", "mask": ""}
        )
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "report.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), tmp_path / "cine.dcm")
    (tmp_path / "notes.dcm").write_text("not an image")
    write_dicom(tmp_path / "masked.dcm", rng.integers(0, 3000, (20, 20)).astype(np.uint16))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small_mask.png")
    rows += [
        {"file": "report.dcm", "label": "0", "patient_id": "PATSR", "mask": ""},
        {"file": "cine.dcm", "label": "1", "patient_id": "PATMF", "mask": ""},
        {"file": "notes.dcm", "label": "0", "patient_id": "PATTXT", "mask": ""},
        {"file": "gone.dcm", "label": "1", "patient_id": "PATGONE", "mask": ""},
        {"file": "good_0.dcm", "label": "0", "patient_id": "PATDUP", "mask": ""},
        {"file": "good_1.dcm", "label": "tumour", "patient_id": "PATLBL", "mask": ""},
        {"file": "x.dcm", "label": "0", "patient_id": "", "mask": ""},
        {"file": "masked.dcm", "label": "1", "patient_id": "PATMASK", "mask": "small_mask.png"},
    ]
    rows[1]["label"] = "7"  # good_1.dcm: out of range
    rows = [row for row in rows if not (row["file"] == "good_1.dcm" and row["label"] == "tumour")]
    config = _dicom_site(tmp_path, rows)
    # The "client" logger's own level may have been set by a ClientApp test in this process.
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="client"):
        data = load_site_data(config, workers=1)
    expected = {
        "not_image": 1,
        "multiframe": 1,
        "not_dicom": 1,
        "missing_file": 1,
        "bad_row": 2,  # listed twice; empty patient id
        "bad_label": 1,
        "mask_error": 1,
    }
    assert data.quarantine_counts == expected
    assert _count(data) == 11
    report = json.loads((tmp_path / "state" / "quarantine.json").read_text())
    assert report["counts"] == expected and report["total"] == 8
    listed = {(entry["file"], entry["reason"]) for entry in report["files"]}
    assert ("report.dcm", "not_image") in listed and ("gone.dcm", "missing_file") in listed
    assert ("masked.dcm", "mask_error") in listed and ("good_1.dcm", "bad_label") in listed
    visible = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    for secret in ("report.dcm", "gone.dcm", "notes.dcm", "PAT", str(tmp_path)):
        assert secret not in visible
    debug = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    assert "gone.dcm" in debug  # the detail is there for the site's own debugging


def test_an_unusable_labels_file_is_a_source_error(tmp_path: Path) -> None:
    config = _dicom_site(tmp_path, [])
    (tmp_path / "labels.csv").write_text("name,class\nx.dcm,1\n")
    with pytest.raises(DataError) as raised:
        load_site_data(config)
    assert raised.value.reason == Reason.SOURCE_ERROR and "patient_id" in str(raised.value)


def _medmnist_config(tmp_path: Path, npz: Path, **data: object) -> SiteConfig:
    return SiteConfig.model_validate(
        {
            "name": "mnist",
            "state_dir": tmp_path / "state",
            "data": {"format": "medmnist", "npz": npz, "class_names": ["normal", "nodule"], **data},
        }
    )


def test_medmnist_archives_keep_their_splits(synth_root: Path, tmp_path: Path) -> None:
    npz = synth_root / "medmnist" / f"synthcxr_{SYNTH_SIZE}.npz"
    arrays = np.load(npz)
    data = load_site_data(_medmnist_config(tmp_path, npz, image_size=32), workers=1)
    for name in SPLIT_NAMES:
        split = data.split(name)
        assert len(split) == len(arrays[f"{name}_images"])
        assert split.images.shape[1:] == (1, 32, 32)
        np.testing.assert_array_equal(split.labels.numpy(), arrays[f"{name}_labels"].ravel())
        assert split.masks == {}


def test_medmnist_colour_and_invalid_archives(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arrays = {}
    for name, count in zip(SPLIT_NAMES, (8, 3, 3), strict=True):
        arrays[f"{name}_images"] = rng.integers(0, 255, (count, 28, 28, 3), dtype=np.uint8)
        arrays[f"{name}_labels"] = (np.arange(count) % 2).astype(np.uint8).reshape(-1, 1)
    np.savez(tmp_path / "colour.npz", **arrays)
    grey = load_site_data(_medmnist_config(tmp_path, tmp_path / "colour.npz"), workers=1)
    assert grey.split("train").images.shape == (8, 1, 128, 128)
    colour_config = _medmnist_config(tmp_path / "c", tmp_path / "colour.npz", keep_colour=True)
    assert load_site_data(colour_config, workers=1).split("val").images.shape[1] == 3
    arrays["train_labels"] = np.zeros((8, 14), np.uint8)
    np.savez(tmp_path / "multi.npz", **arrays)
    with pytest.raises(DataError, match="multi-label"):
        load_site_data(_medmnist_config(tmp_path / "m", tmp_path / "multi.npz"))
    np.savez(tmp_path / "partial.npz", train_images=arrays["train_images"])
    with pytest.raises(DataError, match="missing"):
        load_site_data(_medmnist_config(tmp_path / "p", tmp_path / "partial.npz"))


def test_image_folders_with_masks_and_patient_ids(tmp_path: Path) -> None:
    root = tmp_path / "images"
    rng = np.random.default_rng(2)
    for label, class_name in enumerate(("normal", "nodule")):
        (root / class_name).mkdir(parents=True)
        for patient in range(6):
            for view in ("a", "b"):
                pixels = rng.integers(0, 120, (30, 40), dtype=np.uint8)
                stem = f"P{label}{patient:02d}_{view}"
                if class_name == "nodule":
                    mask = np.zeros((30, 40), np.uint8)
                    mask[10:16, 20:28] = 255
                    pixels[mask > 0] = 250
                    (root / "masks" / class_name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(root / "masks" / class_name / f"{stem}.png")
                Image.fromarray(pixels).convert("RGB").save(root / class_name / f"{stem}.png")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG not really")
    config = SiteConfig.model_validate(
        {
            "name": "folders",
            "state_dir": tmp_path / "state",
            "data": {
                "format": "folder",
                "root": root,
                "class_names": ["normal", "nodule"],
                "image_size": 40,
                "patient_id_pattern": r"^(P\d+)_",
            },
        }
    )
    data = load_site_data(config, workers=1)
    assert data.quarantine_counts == {"bad_row": 1}  # broken.png has no patient id
    assert _count(data) == 24
    owners: dict[str, set[str]] = {}
    for name in SPLIT_NAMES:
        split = data.split(name)
        for patient, label, has, mask, image in zip(
            split.patient_ids,
            split.labels,
            split.has_mask["lesion"],
            split.masks["lesion"],
            split.images,
            strict=True,
        ):
            owners.setdefault(patient, set()).add(name)
            assert bool(has) == (int(label) == 1)
            if has:
                assert float(image[0][mask[0] > 0].mean()) > 0.9
    assert len(owners) == 12 and all(len(found) == 1 for found in owners.values())
    unpatterned = config.data.model_copy(update={"patient_id_pattern": None})
    unpatterned_config = config.model_copy(
        update={"data": unpatterned, "state_dir": tmp_path / "state2"}
    )
    broken = load_site_data(unpatterned_config, workers=1)
    assert broken.quarantine_counts == {"decode_error": 1}
