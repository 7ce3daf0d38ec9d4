"""Patient-level, stratified, deterministic splits."""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from client.config import SiteConfig
from client.data import Split, assign_patient_splits, load_site_data
from tests.client.conftest import write_dicom


def _cohort(patients: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Patients with one to four images each; ~30 % positive."""
    rng = random.Random(seed)
    ids, labels = [], []
    for index in range(patients):
        label = int(rng.random() < 0.3)
        for _ in range(rng.randint(1, 4)):
            ids.append(f"P{index:04d}")
            labels.append(label)
    return ids, labels


def test_no_patient_is_in_two_splits() -> None:
    ids, labels = _cohort(300)
    splits = assign_patient_splits(ids, labels, seed=1)
    seen: dict[str, set[Split]] = defaultdict(set)
    for patient, split in zip(ids, splits, strict=True):
        seen[patient].add(split)
    assert all(len(found) == 1 for found in seen.values())


def test_splits_are_stratified_and_near_70_15_15() -> None:
    ids, labels = _cohort(400)
    splits = assign_patient_splits(ids, labels, seed=0)
    per_patient = dict(zip(ids, zip(splits, labels, strict=True), strict=True))
    for label in (0, 1):
        members = [split for split, lab in per_patient.values() if lab == label]
        shares = {split: members.count(split) / len(members) for split in Split}
        assert abs(shares[Split.TRAIN] - 0.70) < 0.02
        assert abs(shares[Split.VAL] - 0.15) < 0.02
        assert abs(shares[Split.TEST] - 0.15) < 0.02


def test_splits_depend_on_the_seed_not_on_the_order() -> None:
    ids, labels = _cohort(120)
    base = dict(zip(ids, assign_patient_splits(ids, labels, seed=4), strict=True))
    order = list(range(len(ids)))
    random.Random(9).shuffle(order)
    shuffled = [ids[i] for i in order], [labels[i] for i in order]
    again = dict(zip(shuffled[0], assign_patient_splits(*shuffled, seed=4), strict=True))
    assert again == base
    other = dict(zip(ids, assign_patient_splits(ids, labels, seed=5), strict=True))
    assert other != base


def test_tiny_strata_still_reach_every_split() -> None:
    ids = [f"P{i}" for i in range(9)]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    splits = assign_patient_splits(ids, labels, seed=0)
    for label in (0, 1, 2):
        assert {s for s, lab in zip(splits, labels, strict=True) if lab == label} == set(Split)
    assert assign_patient_splits(["only"], [1], seed=0) == [Split.TRAIN]


def test_site_pipeline_splits_by_patient(tmp_path: Path) -> None:
    ids, labels = _cohort(40, seed=3)
    rng = np.random.default_rng(0)
    rows = []
    for index, (patient, label) in enumerate(zip(ids, labels, strict=True)):
        name = f"img{index:03d}.dcm"
        write_dicom(tmp_path / "dicom" / name, rng.integers(0, 4000, (16, 16)).astype(np.uint16))
        rows.append({"file": f"dicom/{name}", "label": label, "patient_id": patient})
    with (tmp_path / "labels.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["file", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    config = SiteConfig.model_validate(
        {
            "name": "split_site",
            "state_dir": tmp_path / "state",
            "data": {
                "format": "dicom",
                "labels_csv": tmp_path / "labels.csv",
                "class_names": ["neg", "pos"],
                "image_size": 16,
            },
        }
    )
    data = load_site_data(config, workers=1)
    owners: dict[str, set[str]] = defaultdict(set)
    for name in ("train", "val", "test"):
        for patient in data.split(name).patient_ids:
            owners[patient].add(name)
    assert len(owners) == 40 and all(len(found) == 1 for found in owners.values())
    assert sum(len(data.split(name)) for name in ("train", "val", "test")) == len(ids)
    assert all(count > 0 for per_class in data.counts().values() for count in per_class.values())
    assert data.warnings == []
