"""The report renderer: every section, escaping, redaction."""

from __future__ import annotations

import re

from sic_core.report import PIXEL_SECTIONS, REPORT_SECTIONS, redact, render_report_html

PNG = "data:image/png;base64,iVBORw0KGgo="


def _report() -> dict:
    return {
        "provenance": {"site": "site_a", "round": 3, "federation_run": "fed-1"},
        "intended_use": "Research use on synthetic data.",
        "limitations": ["Not a medical device."],
        "data_sheet": {"class_names": ["normal", "nodule"], "class_counts": {"train": [40, "<10"]}},
        "performance": {"metrics": [{"key": "perf/auroc", "value": 0.93, "ci": "0.90-0.96"}]},
        "xai": [
            {"key": "xai/rma_lift", "value": 4.2, "trend": [1.0, 3.0, 4.2], "band": [[1, 2]] * 3},
            {"key": "xai/artifact_mass_lift", "value": 7.0, "flagged": True},
        ],
        "gallery": [
            {
                "title": "case <script>alert(1)</script>",
                "input_png": PNG,
                "overlay_png": PNG,
                "evidence": [
                    {"label": "support 1", "value": 0.4},
                    {"label": "bias", "value": -0.7},
                ],
                "supports": [{"png": PNG, "map_png": PNG, "label": "nodule #1", "evidence": 0.4}],
            }
        ],
        "support_set": [{"png": PNG, "map_png": PNG, "label": "nodule #1"}],
        "released": [["weights", "1.2 MB"], ["xai/rma_lift", 4.2]],
    }


def test_every_section_is_rendered_with_its_content() -> None:
    page = render_report_html(_report())
    for anchor, title in REPORT_SECTIONS:
        assert f'id="{anchor}"' in page and title in page
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert page.count(PNG) == 6
    assert 'class="flag"' in page
    assert "<svg" in page


def test_redaction_drops_every_pixel_section() -> None:
    redacted = redact(_report())
    assert redacted["redacted"] is True
    assert not set(PIXEL_SECTIONS) & set(redacted)
    page = render_report_html(redacted)
    assert "data:image/png" not in page
    assert "Redacted copy" in page
    assert "xai/rma_lift" in page


def test_non_png_image_sources_are_refused() -> None:
    report = _report()
    report["gallery"][0]["input_png"] = "https://example.org/leak.png"
    assert "example.org" not in render_report_html(report)


def _svg_texts(page: str, label: str) -> list[list[str]]:
    """The text elements of every SVG whose aria-label is ``label``, in order."""
    charts = re.findall(rf'<svg[^>]*aria-label="{label}".*?</svg>', page)
    return [re.findall(r"<text[^>]*>([^<]*)</text>", chart) for chart in charts]


def test_trend_lines_label_their_value_range_and_rounds() -> None:
    report = _report()
    report["xai"][0]["rounds"] = [4, 6, 7]
    texts = _svg_texts(render_report_html(report), "trend over rounds")
    # rma_lift: values 1.0-4.2 with the others' band 1-2; its x axis runs round 4 to 7.
    assert texts[0] == ["round 4", "4.2", "1", "round 7"]


def test_a_flat_trend_shows_its_one_value() -> None:
    report = _report()
    report["xai"][0].update(trend=[0.5, 0.5], band=None, rounds=None)
    assert _svg_texts(render_report_html(report), "trend over rounds")[0] == [
        "eval 1",
        "0.5",
        "eval 2",
    ]


def test_reliability_diagram_has_ticked_axes() -> None:
    report = _report()
    report["performance"]["reliability"] = [{"lower": 0.5, "upper": 0.6, "accuracy": 0.55}]
    (texts,) = _svg_texts(render_report_html(report), "reliability diagram")
    assert texts[:6] == ["0", "0", "0.5", "0.5", "1", "1"]
    assert "confidence (predicted class)" in texts and "accuracy" in texts


def test_confidence_intervals_and_both_reliability_diagrams_are_shown() -> None:
    report = _report()
    bins = [{"lower": 0.9, "upper": 1.0, "confidence": 0.95, "accuracy": 1.0, "share": 1.0}]
    report["performance"] = {
        "metrics": [
            {"key": "perf/auroc", "value": 0.93, "ci": [0.901, 0.962]},
            {"key": "perf/ece", "value": 0.04, "ci": "n<10"},
            {"key": "perf/balanced_accuracy", "value": 0.9},
        ],
        "reliability": bins,
        "reliability_raw": [{**bins[0], "lower": 0.6, "upper": 0.6667, "confidence": 0.63}],
    }
    page = render_report_html(report)
    assert "[0.901, 0.962]" in page and "n&lt;10" in page
    assert page.count('aria-label="reliability diagram"') == 2
    assert "before and after" in page


def test_every_gallery_support_shows_its_why_similar_line() -> None:
    report = _report()
    why = {
        "line": "similar mainly through position (0.41) and intensity (0.15)",
        "influence": {
            "intensity": 0.15,
            "contrast": 0.05,
            "texture": -0.2,
            "shape": 0.19,
            "position": 0.41,
        },
    }
    report["gallery"][0]["supports"][0]["why"] = why
    report["support_set"][0]["why"] = why
    page = render_report_html(report)
    assert page.count("similar mainly through position (0.41)") == 2
    assert page.count('aria-label="why similar"') == 2
    assert "over the audit set: similar mainly" in page


def test_the_summary_shows_each_auroc_with_its_interval() -> None:
    from sic_core.report import render_federation_summary_html

    summary = {
        "run": "fed-1",
        "rounds": [1],
        "columns": [
            "perf/auroc",
            "perf/auroc_ci_low",
            "perf/auroc_ci_high",
            "perf/ece",
            "perf/ece_raw",
        ],
        "rows": [
            {
                "round": 1,
                "site": "site_a",
                "perf/auroc": 0.95,
                "perf/auroc_ci_low": 0.9,
                "perf/auroc_ci_high": 0.99,
                "perf/ece": 0.04,
            },
            {
                "round": 1,
                "site": "site_b",
                "perf/auroc": 1.0,
                "perf/auroc_ci_low": None,
                "perf/auroc_ci_high": None,
                "perf/ece": 0.03,
                "perf/ece_raw": 0.371,
            },
        ],
    }
    page = render_federation_summary_html(summary)
    assert "0.95<br><span" in page and "[0.9, 0.99]" in page and "no CI" in page
    assert "raw 0.371" in page
    assert "auroc_<wbr>ci_<wbr>low" not in page and "ece_<wbr>raw" not in page
