"""The whole data pipeline of one site: records → cached preprocessed tensors → splits."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from rich.progress import track

from client.config import SiteConfig
from client.data.cache import FileDigests, Pack, PackStore
from client.data.decode import decode_records
from client.data.loaders import DataSource, Record, open_source
from client.data.quarantine import QuarantineEntry, count_reasons, write_quarantine_report
from client.data.splits import SPLITS, Split, assign_patient_splits
from sic_core.errors import DataError

__all__ = ["SiteData", "SplitData", "load_site_data"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class SplitData:
    """The preprocessed images of one split.

    Attributes
    ----------
    images
        float32 ``(N, C, S, S)`` in [0, 1]; C = 1 (grey) unless the site keeps colour.
    labels
        int64 ``(N,)`` class indices.
    masks
        uint8 ``(N, 1, S, S)`` in {0, 1} per mask name the site declares (``lesion``,
        ``marker``, ``distractor``); all zero where an image has no such mask.
    has_mask
        bool ``(N,)`` per mask name: whether the image's mask is known (an empty mask
        declared in labels.csv counts as known).
    patient_ids
        Site-local patient pseudonyms (never leave the site).
    files
        Site-local file identifiers as written in the data (never leave the site).
    """

    images: torch.Tensor
    labels: torch.Tensor
    masks: dict[str, torch.Tensor]
    has_mask: dict[str, torch.Tensor]
    patient_ids: list[str]
    files: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SiteData:
    """Everything a site trains and evaluates on, plus what was skipped.

    Attributes
    ----------
    site
        The site pseudonym.
    class_names
        Label map (index = label).
    splits
        ``train``, ``val`` and ``test``.
    quarantine_counts
        Skipped files by reason code (the only part of the quarantine that may leave).
    quarantine_report
        Site-local report listing every skipped file.
    cached
        Images taken from the on-disk cache in this load.
    decoded
        Files decoded in this load (failures included).
    warnings
        Problems that do not stop training (e.g. a patient in two declared splits).
    """

    site: str
    class_names: list[str]
    splits: dict[str, SplitData]
    quarantine_counts: dict[str, int]
    quarantine_report: Path
    cached: int = 0
    decoded: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes of the site's label map."""
        return len(self.class_names)

    def split(self, name: str) -> SplitData:
        """One split: ``"train"``, ``"val"`` or ``"test"``."""
        try:
            return self.splits[Split(name)]
        except ValueError:
            raise KeyError(f"unknown split {name!r}; expected train, val or test") from None

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class name."""
        result = {}
        for name, data in self.splits.items():
            per_class = torch.bincount(data.labels, minlength=self.num_classes).tolist()
            result[str(name)] = dict(zip(self.class_names, per_class, strict=True))
        return result

    def problems(self) -> list[str]:
        """Why this site cannot train (empty when it can)."""
        counts = self.counts()
        found = []
        if not len(self.splits[Split.TRAIN]):
            found.append("the train split is empty")
        else:
            missing = [name for name, count in counts["train"].items() if count == 0]
            if missing:
                found.append(f"no training images of class(es) {missing}")
        if not len(self.splits[Split.VAL]):
            found.append("the val split is empty (needed to select and monitor models)")
        return found


def _progress(items: Sequence[_T], description: str, enabled: bool) -> Iterable[_T]:
    if enabled and items:
        return track(items, description=description, transient=True)
    return items


def _digests(
    source: DataSource, records: list[Record], cache_root: Path, progress: bool
) -> Iterator[tuple[Record, str | DataError]]:
    digests = FileDigests(cache_root / "file-digests.json")
    try:
        for record in _progress(records, "Hashing files", progress):
            try:
                yield record, source.digest(record, digests)
            except DataError as error:
                yield record, error
    finally:
        digests.save()


def _preprocessing_settings(config: SiteConfig) -> dict[str, object]:
    """Every setting that changes a cached tensor (the cache folder is their digest)."""
    data = config.data
    return {
        "format": str(data.format),
        "image_size": data.image_size,
        "keep_colour": data.keep_colour,
        "frame": data.frame,
        "allowed_modalities": data.allowed_modalities,
        "max_decoded_megabytes": data.max_decoded_megabytes,
        "percentiles": list(config.preprocessing.percentiles),
    }


def load_site_data(
    config: SiteConfig, *, progress: bool = False, workers: int | None = None
) -> SiteData:
    """Run the site's whole pipeline, using the cache under ``state_dir/cache``.

    Every bad file or row is skipped, counted by reason and listed in
    ``state_dir/quarantine.json``; patients without a declared split are split 70/15/15
    (``data.split_fractions``) by patient, stratified by label, from ``config.seed``.

    Parameters
    ----------
    config
        The validated site config.
    progress
        Show progress bars (hashing, decoding) on the terminal.
    workers
        Processes that decode images not in the cache; default: the usable CPU cores (at
        most 4); 1 decodes in this process.

    Returns
    -------
    SiteData
        The three splits as tensors, and the quarantine counts.

    Raises
    ------
    DataError
        ``source_error`` when the data source as a whole is unusable (no labels file,
        not a MedMNIST archive, no class folders). Single bad files never raise.
    """
    source = open_source(config)
    records, quarantined = source.records()
    cache_root = config.state_dir / "cache"
    keyed: list[tuple[Record, str]] = []
    for record, outcome in _digests(source, records, cache_root, progress):
        if isinstance(outcome, DataError):
            quarantined.append(QuarantineEntry(record.key, outcome.reason, str(outcome)))
        else:
            keyed.append((record, outcome))

    store = PackStore(cache_root, _preprocessing_settings(config))
    old = store.load()
    old_rows = old.row_of() if old is not None else {}
    failures = dict(old.failures) if old is not None else {}
    fresh: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    to_decode: dict[str, Record] = {}
    for record, key in keyed:
        if key not in old_rows and key not in failures:
            to_decode.setdefault(key, record)
    outcomes = decode_records(
        source,
        list(to_decode.values()),
        size=config.data.image_size,
        percentiles=config.preprocessing.percentiles,
        workers=workers,
        progress=progress,
    )
    for key, (_, outcome) in zip(to_decode, outcomes, strict=True):
        if isinstance(outcome[0], np.ndarray):
            fresh[key] = outcome
        else:
            failures[key] = outcome

    usable = []
    for record, key in keyed:
        if key in failures:
            reason, message = failures[key]
            quarantined.append(QuarantineEntry(record.key, reason, message))
        else:
            usable.append((record, key))
    splits = _splits_of([record for record, _ in usable], config)
    ordered = [
        (record, key)
        for split in SPLITS
        for (record, key), assigned in zip(usable, splits, strict=True)
        if assigned is split
    ]
    ordered_splits = [split for split in SPLITS for assigned in splits if assigned is split]
    keys = [key for _, key in ordered]
    pack = _assemble(old, fresh, keys, [record for record, _ in ordered], config)
    present = {key for _, key in keyed}
    used_failures = {key: value for key, value in failures.items() if key in present}
    pack.failures = used_failures
    if old is None or fresh or old.keys != keys or old.failures != used_failures:
        store.save(pack)

    report = write_quarantine_report(config.state_dir, config.name, quarantined)
    counts = count_reasons(quarantined)
    warnings = _leakage_warnings(ordered, ordered_splits)
    logger.info(
        "Site data: %d images (%d from cache, %d decoded), %d skipped %s",
        len(keys),
        len(keys) - len(fresh),
        len(fresh),
        len(quarantined),
        counts,
    )
    return SiteData(
        site=config.name,
        class_names=list(config.data.class_names),
        splits=_split_tensors(pack, ordered, ordered_splits),
        quarantine_counts=counts,
        quarantine_report=report,
        cached=len(keys) - len(fresh),
        decoded=len(to_decode),
        warnings=warnings,
    )


def _splits_of(records: list[Record], config: SiteConfig) -> list[Split]:
    """Declared splits where given; the rest split by patient."""
    undeclared = [index for index, record in enumerate(records) if record.split is None]
    assigned = assign_patient_splits(
        [records[index].patient_id for index in undeclared],
        [records[index].label for index in undeclared],
        seed=config.seed,
        fractions=config.data.split_fractions,
    )
    splits = [record.split for record in records]
    for index, split in zip(undeclared, assigned, strict=True):
        splits[index] = split
    return [split for split in splits if split is not None]


def _leakage_warnings(ordered: list[tuple[Record, str]], splits: list[Split]) -> list[str]:
    seen: dict[str, set[Split]] = {}
    for (record, _), split in zip(ordered, splits, strict=True):
        seen.setdefault(record.patient_id, set()).add(split)
    shared = sum(1 for found in seen.values() if len(found) > 1)
    if not shared:
        return []
    return [f"{shared} patient(s) have images in more than one split (declared in the data)"]


def _assemble(
    old: Pack | None,
    fresh: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]],
    keys: list[str],
    records: list[Record],
    config: SiteConfig,
) -> Pack:
    """Stack the rows for ``keys`` in order, reusing ``old`` without copying when possible."""
    if old is not None and not fresh and old.keys == keys:
        return Pack(keys, old.images, old.masks, old.has_mask)
    names = sorted({name for record in records for name in record.masks})
    channels = 3 if config.data.keep_colour else 1
    size = config.data.image_size
    images = np.empty((len(keys), channels, size, size), np.float32)
    masks = {name: np.zeros((len(keys), 1, size, size), np.uint8) for name in names}
    has_mask = {name: np.zeros(len(keys), bool) for name in names}
    previous = old if old is not None else Pack([], images[:0])
    previous_rows = previous.row_of()
    for row, (key, record) in enumerate(zip(keys, records, strict=True)):
        if key in fresh:
            image, item_masks = fresh[key]
            images[row] = image
            for name, mask in item_masks.items():
                masks[name][row] = mask
        else:
            source_row = previous_rows[key]
            images[row] = previous.images[source_row]
            for name in names:
                if name in previous.masks:
                    masks[name][row] = previous.masks[name][source_row]
        for name in record.masks:
            has_mask[name][row] = True
    return Pack(keys, images, masks, has_mask)


def _split_tensors(
    pack: Pack, ordered: list[tuple[Record, str]], splits: list[Split]
) -> dict[str, SplitData]:
    """Views into the pack's arrays, one contiguous block per split (no copies)."""
    images = torch.from_numpy(pack.images)
    masks = {name: torch.from_numpy(array) for name, array in pack.masks.items()}
    has_mask = {name: torch.from_numpy(array) for name, array in pack.has_mask.items()}
    labels = torch.tensor([record.label for record, _ in ordered], dtype=torch.int64)
    bounds = Counter(splits)
    result = {}
    start = 0
    for split in SPLITS:
        stop = start + bounds.get(split, 0)
        block = ordered[start:stop]
        result[str(split)] = SplitData(
            images=images[start:stop],
            labels=labels[start:stop],
            masks={name: tensor[start:stop] for name, tensor in masks.items()},
            has_mask={name: tensor[start:stop] for name, tensor in has_mask.items()},
            patient_ids=[record.patient_id for record, _ in block],
            files=[record.key for record, _ in block],
        )
        start = stop
    return result
