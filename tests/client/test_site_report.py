"""The site's report: full copy at the site, redacted copy to the server, renders in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from client.audit import audit_metrics, select_audit_set
from client.site_report import ReportInputs, build_site_report, small_cell, write_site_report
from sic_core.report import REPORT_SECTIONS

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def report() -> dict:
    from sic_core import create_model

    torch.manual_seed(0)
    n = 24
    images = torch.rand(n, 1, 32, 32)
    labels = torch.arange(n) % 2
    lesion = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    lesion[labels == 1, :, 10:16, 10:16] = 1
    audit = select_audit_set(images, labels, {"lesion": lesion}, size=8, seed=0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=2, proj_dim=16, width=8)
    model.set_support(model.embed(images[:4]).detach(), torch.tensor([0, 0, 1, 1]))
    metrics, _ = audit_metrics(model, audit, support_ids=torch.arange(4), previous=None, steps=4)
    inputs = ReportInputs(
        provenance={"site": "site_a", "round": 2, "federation_run": "fed-test"},
        class_names=["normal", "nodule"],
        class_counts={"train": {"normal": 40, "nodule": 3}},
        quarantine={"decode_error": 2},
        performance={"perf/auroc": 0.91},
        metrics=metrics,
        history=[{"perf/auroc": 0.85, "xai/gini": 0.4}],
        released=[("weights (unit-norm filters)", "1 array record"), ("perf/auroc", 0.91)],
    )
    return build_site_report(inputs, model, audit, images[:4])


def test_small_cells_are_masked() -> None:
    assert small_cell(3) == "<10" and small_cell(0) == 0 and small_cell(10) == 10


def test_full_copy_stays_and_redacted_copy_leaves(tmp_path: Path, report: dict) -> None:
    leaving = write_site_report(report, tmp_path, share_images=False)
    assert "gallery" not in leaving and leaving["redacted"] is True
    assert "data:image/png" not in json.dumps(leaving)
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["gallery"] and "data:image/png" in (tmp_path / "report.html").read_text()
    assert stored["data_sheet"]["class_counts"]["train"] == [40, "<10"]
    shared = write_site_report(report, tmp_path, share_images=True)
    assert shared["gallery"]


def test_report_renders_in_headless_chromium(tmp_path: Path, report: dict) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is required (.ci/run installs it)"
    write_site_report(report, tmp_path, share_images=True)
    page = (tmp_path / "report.html").as_uri()
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [*common, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for anchor, title in REPORT_SECTIONS:
        assert f'id="{anchor}"' in dom and title in dom
    assert dom.count("<img") >= 8
    shot = tmp_path / "report.png"
    subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1200,1800", page],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1200, 1800)
    low, high = pixels.getextrema()
    assert high - low > 100  # not a blank page
