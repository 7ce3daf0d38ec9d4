"""Site-data throughput: SynthCXR generation, DICOM decoding, cached loading.

- ``synth_3x600_s``: seconds to generate SynthCXR sites A, B, C with 600 images each at
  128 px (DICOM, masks, CSV, npz included); target 15 s on 2 cores.
- ``dicom_images_per_s``: ``load_site_data`` on those sites with an empty cache: hashing,
  DICOM decoding, percentile scaling, MONAI resize, writing the cache; target 500/s.
- ``cached_images_per_s``: ``load_site_data`` again (median of repeats), including one read
  of every pixel, as a new ClientApp process each round does; target 20 000/s.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from client.config import SiteConfig, load_site_config
from client.data import load_site_data
from client.synth import default_sites, generate_synthcxr

__all__ = ["run"]

_SITES = ("site_a", "site_b", "site_c")


def _cached_seconds(config: SiteConfig, repeats: int) -> tuple[int, float]:
    timings = []
    count = 0
    for _ in range(repeats):
        started = time.perf_counter()
        data = load_site_data(config)
        count = 0
        for name in ("train", "val", "test"):
            images = data.split(name).images
            float(images.sum())  # read every pixel once: the mapping is lazy
            count += len(images)
        timings.append(time.perf_counter() - started)
    return count, statistics.median(timings)


def run(
    workdir: Path, *, images_per_site: int = 600, size: int = 128, repeats: int = 5
) -> dict[str, float]:
    """Measure the three data figures in ``workdir`` (created; left for the caller to remove).

    Parameters
    ----------
    workdir
        Scratch folder.
    images_per_site
        Images per training site (600 for the recorded figures).
    size
        Image side in pixels (128 for the recorded figures).
    repeats
        Cached loads per site; the median counts.

    Returns
    -------
    dict
        ``synth_3x600_s``, ``dicom_images_per_s``, ``cached_images_per_s``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    sites = [spec.model_copy(update={"count": images_per_site}) for spec in default_sites()[:3]]
    started = time.perf_counter()
    root = generate_synthcxr(workdir / "synth", preset="default", size=size, sites=sites)
    synth_seconds = time.perf_counter() - started

    configs = [load_site_config(root / name / "site.yaml") for name in _SITES]
    decoded, decode_seconds = 0, 0.0
    for config in configs:
        started = time.perf_counter()
        data = load_site_data(config)
        decode_seconds += time.perf_counter() - started
        decoded += data.decoded
    cached, cached_seconds = 0, 0.0
    for config in configs:
        count, seconds = _cached_seconds(config, repeats)
        cached += count
        cached_seconds += seconds
    return {
        "synth_3x600_s": synth_seconds,
        "dicom_images_per_s": decoded / decode_seconds,
        "cached_images_per_s": cached / cached_seconds,
    }
