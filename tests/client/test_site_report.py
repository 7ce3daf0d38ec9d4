"""The site's report: full copy at the site, redacted copy to the server, renders in Chromium."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from client.audit import audit_metrics, select_audit_set
from client.site_report import (
    ReportInputs,
    build_site_report,
    small_cell,
    suppress_small_cells,
    write_site_report,
)
from sic_core.report import REPORT_SECTIONS


@pytest.fixture(scope="module")
def parts() -> tuple:
    """(inputs, model, audit, support images) of a small, untrained site (it makes errors)."""
    from sic_core import create_model

    torch.manual_seed(0)
    n = 24
    images = torch.rand(n, 1, 32, 32)
    labels = torch.arange(n) % 2
    lesion = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    lesion[labels == 1, :, 10:16, 10:16] = 1
    audit = select_audit_set(images, labels, {"lesion": lesion}, size=8, seed=0)
    # b=2 pins the untrained model whose most confident case is a fixed gallery case, the
    # overlap test_the_gallery_shows_each_case_once_and_marks_every_error needs.
    model = create_model("bcos_cnn_small", 1, 2, n_shot=2, proj_dim=16, width=8, b=2)
    model.set_support(model.embed(images[:4]).detach(), torch.tensor([0, 0, 1, 1]))
    metrics, _ = audit_metrics(model, audit, support_ids=torch.arange(4), previous=None, steps=4)
    inputs = ReportInputs(
        provenance={"site": "site_a", "round": 2, "federation_run": "fed-test"},
        class_names=["normal", "nodule"],
        class_counts={"train": {"normal": 40, "nodule": 3}, "val": {"normal": 20, "nodule": 12}},
        quarantine={"decode_error": 2},
        performance={"perf/auroc": 0.91},
        metrics=metrics,
        history=[{"round": 1, "perf/auroc": 0.85, "xai/gini": 0.4}],
        released=[("weights (unit-norm filters)", "1 array record"), ("perf/auroc", 0.91)],
    )
    return inputs, model, audit, images[:4]


@pytest.fixture(scope="module")
def report(parts: tuple) -> dict:
    return build_site_report(*parts)


def test_small_cells_are_masked() -> None:
    assert small_cell(3) == "<10" and small_cell(0) == 0 and small_cell(10) == 10


def test_full_copy_stays_and_redacted_copy_leaves(tmp_path: Path, report: dict) -> None:
    leaving = write_site_report(report, tmp_path, share_images=False)
    assert "gallery" not in leaving and leaving["redacted"] is True
    assert "data:image/png" not in json.dumps(leaving)
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["gallery"] and "data:image/png" in (tmp_path / "report.html").read_text()
    assert stored["data_sheet"]["class_counts"] == {
        "train": ["suppressed", "suppressed"],
        "val": [20, 12],
    }
    shared = write_site_report(report, tmp_path, share_images=True)
    assert shared["gallery"]


def _candidates(shown: list, total: int, small_class: int) -> set[int]:
    """Every count of ``small_class`` consistent with a shown row and the split's total.

    What an outsider can do: the split's total is public (``num-examples``, ``audit_cases``)
    and so is the display rule, so try every split of the total into classes.
    """
    return {
        counts[small_class]
        for counts in itertools.product(range(total + 1), repeat=len(shown))
        if sum(counts) == total and suppress_small_cells(counts) == shown
    }


@pytest.mark.parametrize("counts", [(45, 3), (1, 10), (2, 9), (12, 5, 30), (0, 7, 25)])
def test_a_suppressed_count_cannot_be_derived_from_the_split_total(
    parts: tuple, counts: tuple[int, ...]
) -> None:
    inputs, model, audit, support_images = parts
    names = [f"class{c}" for c in range(len(counts))]
    total = sum(counts)
    report = build_site_report(
        dataclasses.replace(
            inputs,
            class_names=names,
            class_counts={"val": dict(zip(names, counts, strict=True))},
            provenance={**inputs.provenance, "audit_cases": total},
        ),
        model,
        audit,
        support_images,
    )
    shown = report["data_sheet"]["class_counts"]["val"]
    known_total = report["provenance"]["audit_cases"]
    small = [c for c, count in enumerate(counts) if 0 < count < 10]
    for small_class in small:
        candidates = _candidates(shown, known_total, small_class)
        assert counts[small_class] in candidates and len(candidates) > 1, (shown, candidates)
    if len(small) == 1:
        # The old display (only the small cell masked) gave it away: the check can fail.
        masked = [small_cell(count) for count in counts]
        assert {
            c[small[0]]
            for c in itertools.product(range(total + 1), repeat=len(counts))
            if sum(c) == total and [small_cell(x) for x in c] == masked
        } == {counts[small[0]]}


def test_counts_without_a_small_cell_are_shown_as_they_are() -> None:
    assert suppress_small_cells([40, 12, 0]) == [40, 12, 0]
    assert suppress_small_cells([40, 9, 0]) == ["suppressed"] * 3


def _gallery_cases(report: dict) -> list[tuple[int, bool, bool]]:
    """(case, shown as an error, truly an error) of every gallery entry, from its title."""
    rows = []
    for case in report["gallery"]:
        title = case["title"]
        number, true, predicted = re.match(
            r"case (\d+): true (\w+), predicted (\w+)", title
        ).groups()
        rows.append((int(number), title.endswith("— error"), true != predicted))
    return rows


def test_the_gallery_shows_each_case_once_and_marks_every_error(parts: tuple) -> None:
    from sic_core import explain

    inputs, model, audit, support_images = parts
    explanation = explain(model, audit.images, per_support=False)
    # Every case wrong: the most confident errors then include fixed cases (the first four),
    # which the gallery used to show a second time.
    wrong = dataclasses.replace(audit, labels=1 - explanation.predicted)
    confidence = explanation.logits.max(dim=1).values
    assert int(confidence.argmax()) < 4  # the overlap this test is about
    report = build_site_report(inputs, model, wrong, support_images, explanation)
    rows = _gallery_cases(report)
    cases = [case for case, _, _ in rows]
    assert len(cases) == len(set(cases)) == 6, cases
    assert cases[:4] == [0, 1, 2, 3]
    later = confidence[4:].argsort(descending=True)[:2] + 4
    assert cases[4:] == later.tolist()
    assert all(shown and truly for _, shown, truly in rows)


def test_gallery_error_marks_follow_the_prediction(report: dict) -> None:
    rows = _gallery_cases(report)
    assert all(shown == truly for _, shown, truly in rows)
    assert any(truly for _, _, truly in rows) and not all(truly for _, _, truly in rows)


def test_report_renders_in_headless_chromium(tmp_path: Path, report: dict, chromium) -> None:
    write_site_report(report, tmp_path, share_images=True)
    page = tmp_path / "report.html"
    dom = chromium.dump_dom(page)
    for anchor, title in REPORT_SECTIONS:
        assert f'id="{anchor}"' in dom and title in dom
    assert dom.count("<img") >= 8
    shot = chromium.screenshot(page, tmp_path / "report.png", width=1200, height=1800)
    pixels = Image.open(shot).convert("L")
    assert pixels.size == (1200, 1800)
    low, high = pixels.getextrema()
    assert high - low > 100  # not a blank page


def test_top_supports_stand_right_of_every_case_in_chromium(
    tmp_path: Path, report: dict, chromium
) -> None:
    write_site_report(report, tmp_path, share_images=True)
    layout = chromium.measure(
        tmp_path / "report.html",
        "{page: document.documentElement.scrollWidth, window: window.innerWidth,"
        " cases: [...document.querySelectorAll('#case-gallery .case')].map(c => {"
        " const r = e => e.getBoundingClientRect();"
        " const input = r(c.querySelector('figure')), bars = r(c.children[2]);"
        " const supports = r(c.querySelector('.supports'));"
        " return {title: c.querySelector('b').textContent, input_top: input.top,"
        " input_bottom: input.bottom, bars_right: bars.right, supports_left: supports.left,"
        " supports_top: supports.top, supports_right: supports.right, case_right: r(c).right};"
        "})}",
        width=1400,
    )
    assert layout["page"] <= layout["window"] == 1400, layout
    boxes = layout["cases"]
    assert len(boxes) == len(report["gallery"])
    assert any(box["title"].endswith("— error") for box in boxes)  # misclassified cases too
    for box in boxes:
        # Beside the bars, level with the input image, inside the case's frame.
        assert box["supports_left"] >= box["bars_right"], box
        assert box["supports_top"] < box["input_bottom"], box
        assert box["supports_right"] <= box["case_right"] + 0.5, box
