"""Patient-level, label-stratified, deterministic train/val/test splits."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from enum import StrEnum

__all__ = ["SPLITS", "Split", "assign_patient_splits", "parse_split"]


class Split(StrEnum):
    """The three splits every site has."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


#: Splits in their canonical order.
SPLITS: tuple[Split, ...] = (Split.TRAIN, Split.VAL, Split.TEST)

_ALIASES = {"validation": Split.VAL, "valid": Split.VAL, "training": Split.TRAIN}


def parse_split(value: str) -> Split:
    """Read a split name as written in a labels file (case-insensitive, common aliases).

    Raises
    ------
    ValueError
        When the value names no split.
    """
    text = value.strip().lower()
    if text in _ALIASES:
        return _ALIASES[text]
    try:
        return Split(text)
    except ValueError:
        raise ValueError(f"unknown split {value!r}; expected train, val or test") from None


def _patient_rank(seed: int, patient_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{patient_id}".encode(), digest_size=16).digest()


def _split_sizes(count: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """Patients per split for one stratum: every split gets one as soon as there are three."""
    _, val_share, test_share = fractions
    val = round(count * val_share)
    test = round(count * test_share)
    if count >= 3:
        val = max(val, 1) if val_share > 0 else 0
        test = max(test, 1) if test_share > 0 else 0
    while val + test >= count and (val or test):
        if val >= test and val:
            val -= 1
        else:
            test -= 1
    return count - val - test, val, test


def assign_patient_splits(
    patient_ids: Sequence[str],
    labels: Sequence[int],
    *,
    seed: int,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
) -> list[Split]:
    """Assign every image a split so that each patient lies in exactly one split.

    Patients are stratified by their most frequent label (ties: the smaller label) and,
    within a stratum, ordered by a keyed hash of the patient id. The result therefore
    depends only on the seed and the set of (patient, label) pairs, not on file order.

    Parameters
    ----------
    patient_ids
        Patient id per image.
    labels
        Integer class label per image.
    seed
        The site's seed.
    fractions
        Shares of patients for train, val and test (summing to 1).

    Returns
    -------
    list of Split
        The split of each image, aligned with ``patient_ids``.
    """
    if len(patient_ids) != len(labels):
        raise ValueError("patient_ids and labels must have the same length")
    label_counts: dict[str, Counter[int]] = defaultdict(Counter)
    for patient, label in zip(patient_ids, labels, strict=True):
        label_counts[patient][int(label)] += 1
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, counts in label_counts.items():
        top = max(counts.values())
        strata[min(label for label, n in counts.items() if n == top)].append(patient)
    assignment: dict[str, Split] = {}
    for patients in strata.values():
        patients.sort(key=lambda patient: _patient_rank(seed, patient))
        _, val, test = _split_sizes(len(patients), fractions)
        for position, patient in enumerate(patients):
            if position < test:
                assignment[patient] = Split.TEST
            elif position < test + val:
                assignment[patient] = Split.VAL
            else:
                assignment[patient] = Split.TRAIN
    return [assignment[patient] for patient in patient_ids]
