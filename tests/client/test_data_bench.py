"""The data benchmark runs end to end (its figures are recorded by ``make bench``)."""

from __future__ import annotations

from pathlib import Path

from bench.data_bench import run


def test_data_bench_reports_its_three_figures(tmp_path: Path) -> None:
    figures = run(tmp_path, images_per_site=12, size=32, repeats=1)
    assert set(figures) == {"synth_3x600_s", "dicom_images_per_s", "cached_images_per_s"}
    assert all(value > 0 for value in figures.values())
    assert (tmp_path / "synth" / "site_c" / "state" / "quarantine.json").is_file()
