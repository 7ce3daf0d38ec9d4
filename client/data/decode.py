"""Decode and preprocess many records, in worker processes when it pays off.

DICOM parsing is pure Python, so threads would not help; worker processes are forked (they
inherit the data source, nothing is pickled but records and results). Like PyTorch's
DataLoader workers, each runs torch single-threaded, which keeps OpenMP safe after fork.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
from rich.progress import Progress

from client.data.loaders import DataSource, Record
from client.data.transforms import preprocess_image
from sic_core.errors import DataError

__all__ = ["Decoded", "decode_records"]

#: (image, masks) for a usable record, (reason, message) for a failed one.
Decoded = tuple[np.ndarray, dict[str, np.ndarray]] | tuple[str, str]

#: Below this many records, starting workers costs more than it saves.
_MIN_PARALLEL = 64
_CHUNK = 16

_worker_job: tuple[DataSource, int, tuple[float, float]] | None = None


def _decode_one(
    source: DataSource, record: Record, size: int, percentiles: tuple[float, float]
) -> Decoded:
    try:
        image, masks = source.load(record)
        return preprocess_image(image, size, percentiles, masks)
    except DataError as error:
        return str(error.reason), str(error)


def _start_worker(source: DataSource, size: int, percentiles: tuple[float, float]) -> None:
    global _worker_job
    torch.set_num_threads(1)
    _worker_job = (source, size, percentiles)


def _decode_chunk(records: list[Record]) -> list[Decoded]:
    if _worker_job is None:
        raise RuntimeError("worker started without a job")
    source, size, percentiles = _worker_job
    return [_decode_one(source, record, size, percentiles) for record in records]


def _default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))


def decode_records(
    source: DataSource,
    records: Sequence[Record],
    *,
    size: int,
    percentiles: tuple[float, float],
    workers: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[Record, Decoded]]:
    """Yield ``(record, outcome)`` for every record, in order.

    Parameters
    ----------
    source
        The site's data source.
    records
        Records to decode.
    size
        Output side length.
    percentiles
        Intensity window.
    workers
        Worker processes; default: the usable CPU cores (at most 4). 1 decodes in-process.
    progress
        Show a progress bar.
    """
    workers = workers if workers is not None else _default_workers()
    parallel = (
        workers > 1
        and len(records) >= _MIN_PARALLEL
        and "fork" in multiprocessing.get_all_start_methods()
    )
    bar = Progress(transient=True) if progress and records else None
    with bar if bar is not None else nullcontext():
        task = bar.add_task("Decoding images", total=len(records)) if bar is not None else 0
        if not parallel:
            for record in records:
                yield record, _decode_one(source, record, size, percentiles)
                if bar is not None:
                    bar.advance(task)
            return
        chunks = [list(records[start : start + _CHUNK]) for start in range(0, len(records), _CHUNK)]
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_worker,
            initargs=(source, size, percentiles),
        ) as pool:
            for chunk, outcomes in zip(chunks, pool.map(_decode_chunk, chunks), strict=True):
                yield from zip(chunk, outcomes, strict=True)
                if bar is not None:
                    bar.advance(task, len(chunk))
