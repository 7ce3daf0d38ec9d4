"""SynthCXR reproduces the facts DATA.md states about it."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from client.config import SiteConfig, load_site_config
from client.data import load_site_data
from client.synth import (
    PRESETS,
    Case,
    default_sites,
    generate_synthcxr,
    load_site_specs,
    plan_site,
    render_case,
)
from sic_core.errors import ConfigError
from tests.client.conftest import SYNTH_SCALE, SYNTH_SIZE

SPLIT_NAMES = ("train", "val", "test")


def _rows(site_folder: Path) -> list[dict[str, str]]:
    with (site_folder / "labels.csv").open(newline="") as stream:
        return list(csv.DictReader(stream))


def _all(data: object, attribute: str) -> np.ndarray:
    return np.concatenate([getattr(data.split(name), attribute).numpy() for name in SPLIT_NAMES])


def test_layout_manifest_and_ready_site_configs(synth_root: Path) -> None:
    manifest = json.loads((synth_root / "manifest.json").read_text())
    assert manifest["preset"]["name"] == "easy" and manifest["size"] == SYNTH_SIZE
    names = [site["name"] for site in manifest["sites"]]
    assert names == ["site_a", "site_b", "site_c", "site_d"]
    assert [site["held_out"] for site in manifest["sites"]] == [False, False, False, True]
    expected = [800, 400, 200, 300]
    assert [site["images"] for site in manifest["sites"]] == [
        round(n * SYNTH_SCALE) for n in expected
    ]
    assert manifest["sites"][1]["marker"] and manifest["sites"][1]["photometric"] == "MONOCHROME1"
    for site in manifest["sites"]:
        folder = synth_root / site["name"]
        rows = _rows(folder)
        assert len(rows) == site["images"] == len(list((folder / "dicom").glob("*.dcm")))
        config = load_site_config(folder / "site.yaml")
        assert config.name == site["name"] and config.data.image_size == SYNTH_SIZE
        assert config.reporting.share_example_images is False
        assert config.data.labels_csv == (folder / "labels.csv").resolve()
        for per_class in site["counts"].values():
            assert all(count > 0 for count in per_class.values())
    npz = np.load(synth_root / "medmnist" / f"synthcxr_{SYNTH_SIZE}.npz")
    training = sum(site["images"] for site in manifest["sites"] if not site["held_out"])
    assert sum(len(npz[f"{name}_images"]) for name in SPLIT_NAMES) == training
    assert npz["train_images"].dtype == np.uint8 and npz["train_labels"].shape[1] == 1


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {
            str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*"))
            if path.is_file()
        }

    first = files(generate_synthcxr(tmp_path / "a", size=32, scale=0.03, seed=11, workers=1))
    # Four sites make four chunks: this run renders in two worker processes.
    second = files(generate_synthcxr(tmp_path / "b", size=32, scale=0.03, seed=11, workers=2))
    assert first.keys() == second.keys() and len(first) > 40
    assert all(first[name] == second[name] for name in first)
    other = files(generate_synthcxr(tmp_path / "c", size=32, scale=0.03, seed=12))
    dicoms = [name for name in first if name.endswith(".dcm") and name in other]
    assert dicoms and all(first[name] != other[name] for name in dicoms)
    # Regenerating into a previous output replaces it.
    again = files(generate_synthcxr(tmp_path / "c", size=32, scale=0.03, seed=11))
    assert again == first


def test_tiny_scales_keep_every_class_in_every_split(tmp_path: Path) -> None:
    root = generate_synthcxr(tmp_path / "tiny", size=32, scale=0.001, classes=3)
    manifest = json.loads((root / "manifest.json").read_text())
    for site in manifest["sites"]:
        assert site["images"] == 9
        for per_class in site["counts"].values():
            assert list(per_class.values()) == [1, 1, 1]
        for row in _rows(root / site["name"]):
            assert row["lesion_type"] == {"0": "none", "1": "solid", "2": "cavitary"}[row["label"]]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_global_histogram_classifier_is_near_chance(preset: str, tmp_path: Path) -> None:
    site_a = default_sites()[0]
    root = generate_synthcxr(tmp_path / preset, preset=preset, size=64, scale=0.25, sites=[site_a])
    config = load_site_config(root / "site_a" / "site.yaml")
    data = load_site_data(config.model_copy(update={"state_dir": tmp_path / "state"}), workers=1)
    images, labels = _all(data, "images")[:, 0], _all(data, "labels")
    histograms = np.stack([np.histogram(image, 32, (0.0, 1.0))[0] for image in images])
    scores = cross_val_predict(
        LogisticRegression(max_iter=5000),
        histograms / images[0].size,
        labels,
        cv=5,
        method="predict_proba",
    )[:, 1]
    assert len(labels) == 200
    assert abs(roc_auc_score(labels, scores) - 0.5) < 0.15


def test_the_shortcut_marker_is_label_correlated_in_train_and_val_only(
    synth_root: Path, synth_site: Callable[..., SiteConfig]
) -> None:
    data = load_site_data(synth_site("site_b"), workers=1)
    rho = default_sites()[1].marker_rho
    for name in SPLIT_NAMES:
        split = data.split(name)
        marked = split.masks["marker"].flatten(1).any(1).numpy()
        labels = split.labels.numpy()
        positive, negative = marked[labels == 1].mean(), marked[labels == 0].mean()
        tolerance = 0.5 / min((labels == 1).sum(), (labels == 0).sum()) + 1e-9
        if name == "test":
            assert abs(positive - 0.5) <= tolerance and abs(negative - 0.5) <= tolerance
        else:
            assert abs(positive - rho) <= tolerance and abs(negative - (1 - rho)) <= tolerance
    rows = _rows(synth_root / "site_b")
    for row in rows[:20]:
        header = pydicom.dcmread(synth_root / "site_b" / row["file"], stop_before_pixels=True)
        assert header.BurnedInAnnotation == ("YES" if row["marker"] == "1" else "NO")
        assert bool(row["marker_mask"]) == (row["marker"] == "1")
    for other in ("site_a", "site_c", "site_d"):
        assert all(row["marker"] == "0" for row in _rows(synth_root / other))


def test_the_marker_is_burned_in_and_small() -> None:
    site_b = default_sites()[1]
    case = Case(index=3, label=0, lesion_type="none", marker=True, distractor=False)
    rendered = render_case(case, site_b, PRESETS["default"], size=128, seed=0, site_index=1)
    marker = rendered.masks["marker"]
    assert 0 < marker.mean() < 0.005  # well under 1 % of the image at 128 px
    assert (rendered.display[marker] == 1.0).all()
    assert (rendered.stored[marker] == 0).all()  # white on a MONOCHROME1 display


def _twin_difference(case: Case, site_index: int, size: int) -> tuple[np.ndarray, object]:
    site = default_sites()[site_index]
    preset = PRESETS["default"]
    args = {"size": size, "seed": 0, "site_index": site_index}
    drawn = render_case(case, site, preset, **args)
    blank = render_case(case, site, preset, draw_findings=False, **args)
    assert drawn.masks.keys() == blank.masks.keys()
    return drawn.display - blank.display, drawn


@pytest.mark.parametrize(
    ("site_index", "lesion_type"), [(0, "solid"), (1, "solid"), (2, "cavitary")]
)
def test_masks_match_the_drawn_lesions(site_index: int, lesion_type: str) -> None:
    size = 128
    site = default_sites()[site_index]
    blur_px = site.blur_mm / (site.fov_mm / size)
    margin = 2 + int(np.ceil(3 * blur_px))
    for index in range(6):
        case = Case(index=index, label=1, lesion_type=lesion_type, marker=False, distractor=True)
        difference, drawn = _twin_difference(case, site_index, size)
        findings = drawn.masks["lesion"] | drawn.masks["distractor"]
        near = binary_dilation(findings, iterations=margin)
        magnitude = np.abs(difference)
        assert magnitude[near].sum() >= 0.99 * magnitude.sum()  # changes only at the findings
        assert (difference[drawn.masks["lesion"]] > 0).mean() > 0.9  # the disc got denser
        lesion = drawn.lesion
        rows, cols = np.nonzero(drawn.masks["lesion"])
        assert abs(rows.mean() - lesion.row) < 0.5 and abs(cols.mean() - lesion.col) < 0.5
        area_radius = np.sqrt(len(rows) / np.pi)
        assert abs(area_radius - lesion.radius_px) < 0.6
        assert not (drawn.masks["lesion"] & drawn.masks["distractor"]).any()


def test_cavitary_nodules_are_hollow() -> None:
    case = Case(index=1, label=2, lesion_type="cavitary", marker=False, distractor=False)
    difference, drawn = _twin_difference(case, 0, 224)
    lesion = drawn.lesion
    rows, cols = np.mgrid[0:224, 0:224]
    distance = np.hypot(rows - lesion.row, cols - lesion.col) / lesion.radius_px
    centre = difference[distance < 0.2].mean()
    wall = difference[(distance > 0.55) & (distance < 0.75)].mean()
    assert wall > 1.4 * centre > 0


def test_written_masks_and_geometry_match_the_generator(synth_root: Path) -> None:
    spec = default_sites()[0]
    plan = plan_site(spec, site_index=0, scale=SYNTH_SCALE, seed=0, classes=2)
    rows = {row["patient_id"]: row for row in _rows(synth_root / "site_a")}
    checked = 0
    for item in plan[:30]:
        row = rows[item.patient_id]
        assert row["split"] == str(item.split) and int(row["label"]) == item.case.label
        rendered = render_case(
            item.case, spec, PRESETS["easy"], size=SYNTH_SIZE, seed=0, site_index=0
        )
        for column, name in (("mask", "lesion"), ("distractor_mask", "distractor")):
            if not row[column]:
                assert name not in rendered.masks
                continue
            written = np.asarray(Image.open(synth_root / "site_a" / row[column])) > 0
            np.testing.assert_array_equal(written, rendered.masks[name])
            checked += 1
        if rendered.lesion is not None:
            assert abs(float(row["lesion_row"]) - rendered.lesion.row) < 0.01
            assert abs(float(row["lesion_radius_px"]) - rendered.lesion.radius_px) < 0.01
    assert checked > 10


@pytest.mark.parametrize("site", ["site_a", "site_b", "site_c", "site_d"])
def test_the_pipeline_reads_back_the_rendered_image(
    site: str, synth_root: Path, synth_site: Callable[..., SiteConfig]
) -> None:
    index = ["site_a", "site_b", "site_c", "site_d"].index(site)
    spec = default_sites()[index]
    data = load_site_data(synth_site(site), workers=1)
    train = data.split("train")
    plan = {
        item.patient_id: item
        for item in plan_site(spec, site_index=index, scale=SYNTH_SCALE, seed=0, classes=2)
    }
    for position in range(5):
        item = plan[train.patient_ids[position]]
        rendered = render_case(
            item.case, spec, PRESETS["easy"], size=SYNTH_SIZE, seed=0, site_index=index
        )
        loaded = train.images[position, 0].numpy()
        # Same orientation, and MONOCHROME1 (site B) inverted back: bright = dense.
        assert np.corrcoef(loaded.ravel(), rendered.display.ravel())[0, 1] > 0.98
    header = pydicom.dcmread(synth_root / site / _rows(synth_root / site)[0]["file"])
    assert header.PhotometricInterpretation == spec.photometric
    assert header.Modality == spec.modality and header.BitsStored == spec.bits_stored
    assert float(header.PixelSpacing[0]) == pytest.approx(spec.fov_mm / SYNTH_SIZE)
    assert header.PatientIdentityRemoved == "YES" and "Synthetic" in header.ImageComments
    assert int(header.pixel_array.max()) < 2**spec.bits_stored


def test_site_lists_from_yaml(tmp_path: Path) -> None:
    spec = default_sites()[0].model_dump(mode="json")
    good = tmp_path / "sites.yaml"
    good.write_text(json.dumps({"sites": [{**spec, "name": "site_x", "count": 12}]}))
    (loaded,) = load_site_specs(good)
    root = generate_synthcxr(tmp_path / "out", size=32, sites=[loaded])
    assert len(_rows(root / "site_x")) == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"sites": [{**spec, "prevalance": 0.5}]}))
    with pytest.raises(ConfigError, match=r"sites\.0\.prevalance: unknown field; did you mean"):
        load_site_specs(bad)
    with pytest.raises(ConfigError, match="not empty"):
        (tmp_path / "foreign").mkdir()
        (tmp_path / "foreign" / "keep.txt").write_text("precious")
        generate_synthcxr(tmp_path / "foreign")
