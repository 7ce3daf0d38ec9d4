"""Evaluation replies with explanation metrics and reports, outlier flags, cross-site context."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.reports import (
    SERVER_FLAGS_FINDING,
    SUMMARY_KEYS,
    federation_summary,
    outlier_flags,
    threshold_params,
    with_site_context,
    write_federation_summary,
    write_site_reports,
)
from server.validation import check_eval_reply
from sic_core.report import json_safe
from sic_core.wire import EvalMetric, RecordKey, ReportKey, SiteKey, XaiMetric, eval_metric_keys

NUM_CLASSES = 2


def eval_content(site: str = "site_a", report: object = None, **overrides: float) -> RecordDict:
    metrics: dict[str, float] = {key: 0.5 for key in eval_metric_keys(NUM_CLASSES)}
    metrics[str(EvalMetric.NUM_EXAMPLES)] = 10
    metrics.update(overrides)
    if report is None:
        report = {"provenance": {"site": site, "round": 1}, "xai": [], "redacted": True}
    text = report if isinstance(report, str) else json.dumps(report)
    return RecordDict(
        {
            str(RecordKey.METRICS): MetricRecord(metrics),
            str(RecordKey.SITE): ConfigRecord({str(SiteKey.NAME): site}),
            str(RecordKey.REPORT): ConfigRecord({str(ReportKey.JSON): text}),
        }
    )


def test_a_complete_reply_passes_and_nan_marks_an_xai_metric_that_does_not_apply() -> None:
    assert check_eval_reply(eval_content(), num_classes=NUM_CLASSES) is None
    no_markers = eval_content(**{str(XaiMetric.ARTIFACT_MASS_LIFT): math.nan})
    assert check_eval_reply(no_markers, num_classes=NUM_CLASSES) is None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({str(XaiMetric.ARTIFACT_MASS_LIFT): math.inf}, "non_finite"),
        ({str(EvalMetric.AUROC): math.nan}, "non_finite"),
        ({str(EvalMetric.ECE): 1.5}, "out_of_range"),
    ],
)
def test_infinite_xai_nan_performance_or_bad_ece_is_rejected(overrides: dict, reason: str) -> None:
    rejection = check_eval_reply(eval_content(**overrides), num_classes=NUM_CLASSES)
    assert rejection is not None and rejection.reason == reason


def test_missing_xai_key_is_rejected() -> None:
    content = eval_content()
    metrics = content[str(RecordKey.METRICS)]
    del metrics["xai/support_jaccard/c1"]
    rejection = check_eval_reply(content, num_classes=NUM_CLASSES)
    assert rejection is not None and rejection.reason == "metric_keys"


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        ("not json", "bad_report"),
        ('{"provenance": {"site": "site_a"}, "x": NaN}', "bad_report"),
        ([1, 2], "bad_report"),
        ({"provenance": {"site": "site_b"}}, "bad_report"),
    ],
)
def test_malformed_report_or_one_naming_another_site_is_rejected(
    report: object, reason: str
) -> None:
    rejection = check_eval_reply(eval_content(report=report), num_classes=NUM_CLASSES)
    assert rejection is not None and rejection.reason == reason


def test_reply_without_report_is_rejected() -> None:
    content = eval_content()
    del content[str(RecordKey.REPORT)]
    rejection = check_eval_reply(content, num_classes=NUM_CLASSES)
    assert rejection is not None and rejection.reason == "missing_report"


def site_metrics(drift: float, completeness: float = 1e-6, artifact: float = 1.0) -> dict:
    return {
        str(XaiMetric.DRIFT_TO_GLOBAL): drift,
        str(XaiMetric.COMPLETENESS): completeness,
        str(XaiMetric.ARTIFACT_MASS_LIFT): artifact,
    }


def test_drift_outlier_is_flagged_by_robust_z_among_three_or_more_sites() -> None:
    sites = {f"s{i}": site_metrics(0.10 + 0.01 * i) for i in range(5)}
    sites["odd"] = site_metrics(0.9)
    flags = outlier_flags(sites)
    assert flags["odd"]["flag/drift_outlier"] == 1
    assert all(flags[f"s{i}"]["flag/drift_outlier"] == 0 for i in range(5))
    # Two sites have no meaningful spread (their MAD is zero): no drift flag at all.
    two = outlier_flags({"a": site_metrics(0.1), "b": site_metrics(0.9)})
    assert all(f["flag/drift_outlier"] == 0 for f in two.values())


def test_completeness_and_artifact_flags_follow_the_thresholds() -> None:
    flags = outlier_flags(
        {
            "broken": site_metrics(0.1, completeness=1e-2),
            "shortcut": site_metrics(0.1, artifact=4.0),
            "clean": site_metrics(0.1, artifact=math.nan),
        }
    )
    assert flags["broken"]["flag/completeness"] == 1
    assert flags["broken"]["flag/artifact_mass_lift"] == 0
    assert flags["shortcut"]["flag/artifact_mass_lift"] == 1
    assert flags["clean"] == {
        "flag/drift_outlier": 0,
        "flag/completeness": 0,
        "flag/artifact_mass_lift": 0,
    }


def test_site_context_ranks_among_sites_and_bands_by_the_others() -> None:
    key = str(XaiMetric.ARTIFACT_MASS_LIFT)
    values = {
        1: {"a": {key: 1.0}, "b": {key: 3.0}, "c": {key: 2.0}},
        2: {"a": {key: 5.0}, "b": {key: 4.0}, "c": {key: 0.5}},
    }
    report = {"xai": [{"key": key, "value": 5.0, "trend": [1.0, 5.0]}], "findings": ["x"]}
    flags = {"flag/artifact_mass_lift": 1, "flag/drift_outlier": 0}
    enriched = with_site_context(report, "a", values, flags)
    row = enriched["xai"][0]
    assert row["rank"] == 1
    assert row["band"] == [[2.0, 3.0], [0.5, 4.0]]
    assert enriched["flags"] == flags
    assert "artifact_mass_lift" in enriched["findings"][-1]
    assert report["findings"] == ["x"]  # the site's own report is not changed
    # Applied again (``server report`` reads enriched reports back from MLflow): one line.
    again = with_site_context(enriched, "a", values, flags)
    assert (
        again["findings"]
        == enriched["findings"]
        == ["x", f"{SERVER_FLAGS_FINDING}artifact_mass_lift."]
    )
    cleared = with_site_context(enriched, "a", values, {"flag/artifact_mass_lift": 0})
    assert cleared["findings"] == ["x"]


def test_reports_and_summary_are_written_as_strict_json_and_html(tmp_path: Path) -> None:
    key = str(XaiMetric.COMPLETENESS)
    values = {1: {"a": {key: 1e-6, "perf/auroc": 0.7}, "b": {key: math.nan, "perf/auroc": 0.6}}}
    flags = {1: {"a": {"flag/completeness": 0}, "b": {"flag/completeness": 1}}}
    report = {"provenance": {"site": "a", "round": 1}, "xai": [{"key": key, "value": math.nan}]}
    folders = write_site_reports(tmp_path, 1, {"a": report})
    stored = json.loads((folders["a"] / "report.json").read_text(), parse_constant=float)
    assert stored["xai"][0]["value"] is None
    assert "SIC explanation report: a, round 1" in (folders["a"] / "report.html").read_text()
    summary = federation_summary("fed-1", values, flags)
    assert summary["flagged_sites_last_round"] == ["b"]
    assert [row["site"] for row in summary["rows"]] == ["a", "b"]
    paths = write_federation_summary(tmp_path, summary)
    json.loads(paths[0].read_text(), parse_constant=pytest.fail)
    assert "Sites flagged in the last round" in paths[1].read_text()


def test_thresholds_are_mlflow_params() -> None:
    params = threshold_params()
    assert params["xai_threshold/completeness_max_rel_err"] == "0.0001"
    assert params["xai_threshold/drift_robust_z"] == "3.0"


def test_json_safe_replaces_non_finite_numbers_everywhere() -> None:
    assert json_safe({"a": [math.nan, 1.0, (math.inf, 2)], "b": {"c": -math.inf}}) == {
        "a": [None, 1.0, [None, 2]],
        "b": {"c": None},
    }


def _wide_summary(sites: int = 6, rounds: int = 3) -> dict:
    """A summary with every column filled and long flag lists (the widest realistic page)."""
    values = {
        r: {
            f"site_{chr(97 + i)}": {key: 0.123456 * (i + 1) * r for key in SUMMARY_KEYS}
            for i in range(sites)
        }
        for r in range(1, rounds + 1)
    }
    every_flag = {"flag/drift_outlier": 1, "flag/completeness": 1, "flag/artifact_mass_lift": 1}
    flags = {r: {site: every_flag for site in values[r]} for r in values}
    return federation_summary("fed-wide", values, flags)


def test_summary_tables_put_the_flags_first_and_scroll_inside_the_page(tmp_path: Path) -> None:
    html = write_federation_summary(tmp_path, _wide_summary())[1].read_text()
    header = html[html.index("<h3>Round 1</h3>") :].split("</tr>", 1)[0]
    assert header.index(">site<") < header.index(">flags<") < header.index("perf/")
    assert html.count('<div class="scroll">') == 3 + 1  # one per round and the trends


def test_federation_summary_fits_1400_px_in_chromium(tmp_path: Path, chromium) -> None:
    page = write_federation_summary(tmp_path, _wide_summary())[1]
    layout = chromium.measure(
        page,
        "{page: document.documentElement.scrollWidth, window: window.innerWidth,"
        " flags: [...document.querySelectorAll('table.summary')].slice(0, -1)"
        ".flatMap(t => [...t.querySelectorAll('tbody td:nth-child(2)')])"
        ".map(td => { const box = td.getBoundingClientRect();"
        " const frame = td.closest('.scroll').getBoundingClientRect();"
        " return [box.left, box.right, frame.left, frame.right]; }),"
        " rounds: [...document.querySelectorAll('table.summary')].slice(0, -1)"
        ".map(t => [t.scrollWidth, t.closest('.scroll').clientWidth])}",
        width=1400,
    )
    assert layout["page"] <= layout["window"] == 1400, layout
    assert len(layout["flags"]) == 6 * 3
    for left, right, frame_left, frame_right in layout["flags"]:
        assert frame_left <= left < right <= frame_right, layout["flags"]
    for table_width, frame_width in layout["rounds"]:
        assert table_width <= frame_width, layout["rounds"]  # every column shows, no scrolling
