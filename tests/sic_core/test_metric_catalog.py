"""Every metric key sicfed sends or logs has one catalog entry, and the report reads it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from sic_core.metric_catalog import (
    METRICS,
    Direction,
    Scope,
    metric_anchor,
    metric_definition,
    wire_definition,
)
from sic_core.report import XAI_THRESHOLDS, crosses_threshold, render_report_html
from sic_core.wire import (
    EvalMetric,
    SupportMetric,
    TrainMetric,
    XaiMetric,
    support_jaccard_key,
)

WIRE_SCHEMAS = {"train": TrainMetric, "support": SupportMetric, "evaluate": EvalMetric}


@pytest.mark.parametrize("phase", sorted(WIRE_SCHEMAS))
def test_every_wire_metric_key_has_an_entry(phase):
    missing = [key for key in WIRE_SCHEMAS[phase] if wire_definition(phase, key) is None]
    assert missing == []


def test_every_explanation_key_has_an_entry():
    keys = [*XaiMetric, support_jaccard_key(0), support_jaccard_key(3)]
    assert [key for key in keys if wire_definition("evaluate", key) is None] == []
    assert [key for key in keys if metric_definition(key) is None] == []


def test_every_key_logged_to_a_site_run_has_an_entry():
    from server.reports import FLAG_KEYS, SUMMARY_KEYS
    from server.tracking import SITE_METRIC_NAMES, site_metric_name

    logged = {name for names in SITE_METRIC_NAMES.values() for name in names.values()}
    logged |= set(FLAG_KEYS) | set(SUMMARY_KEYS)
    logged |= {f"fed/{phase}_ok" for phase in SITE_METRIC_NAMES}
    assert sorted(key for key in logged if metric_definition(key) is None) == []
    # The catalog ties each wire key to the MLflow key the server logs it under.
    for phase, names in SITE_METRIC_NAMES.items():
        for wire_key, mlflow_key in names.items():
            assert wire_definition(phase, wire_key).key == mlflow_key
    assert (
        site_metric_name("evaluate", str(XaiMetric.GINI))
        == metric_definition(str(XaiMetric.GINI)).key
    )


def test_every_key_logged_to_the_federation_run_has_an_entry():
    from server.federation import _round_summary

    report = SimpleNamespace(ok=["site_a"], problems=[])
    strategy = SimpleNamespace(
        reports={phase: report for phase in ("train", "support", "evaluate")}, clipped=[]
    )
    evaluated = {
        "sites.mean-auroc": 0.9,
        "sites.min-auroc": 0.8,
        str(EvalMetric.AUROC): 0.9,
        str(EvalMetric.BALANCED_ACCURACY): 0.8,
        str(EvalMetric.LOSS): 0.3,
    }
    summary = _round_summary(strategy, {"train.loss": 0.4}, evaluated, 12.0)
    keys = {*summary, "fed/flagged_sites"}
    assert len(keys) > 10  # the stub reached every branch
    assert sorted(key for key in keys if metric_definition(key) is None) == []


def test_one_entry_per_key_and_every_field_filled():
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    for m in METRICS:
        for text in (m.name, m.meaning, m.formula, m.value_range, m.action):
            assert text.strip(), m.key
        assert isinstance(m.direction, Direction)
        assert (m.threshold is None) == (m.flagged_when is None), m.key
        if m.scope is Scope.WIRE:
            assert m.wire_key == m.key
    anchors = [metric_anchor(k) for k in keys]
    assert len(anchors) == len(set(anchors))


def test_flags_point_at_entries():
    from server.reports import DRIFT_ROBUST_Z, FLAG_KEYS

    raised = {m.flag for m in METRICS if m.flag}
    assert raised == set(FLAG_KEYS)
    assert f"above {DRIFT_ROBUST_Z:g}" in metric_definition(str(XaiMetric.DRIFT_TO_GLOBAL)).rule()


def test_the_dashboard_thresholds_come_from_the_catalog():
    assert {
        str(XaiMetric.COMPLETENESS): 1e-4,
        str(XaiMetric.ARTIFACT_MASS_LIFT): 2.0,
        str(XaiMetric.RMA_LIFT): 1.0,
    } == XAI_THRESHOLDS
    assert crosses_threshold(str(XaiMetric.RMA_LIFT), 0.9)
    assert not crosses_threshold(str(XaiMetric.RMA_LIFT), 1.1)
    assert crosses_threshold(str(XaiMetric.ARTIFACT_MASS_LIFT), 2.5)
    assert not crosses_threshold(str(XaiMetric.ARTIFACT_MASS_LIFT), math.nan)
    assert not crosses_threshold("xai/unknown", 1e9)


def test_the_dashboard_names_each_metric_and_links_its_entry():
    key = str(XaiMetric.ARTIFACT_MASS_LIFT)
    definition = metric_definition(key)
    page = render_report_html(
        {
            "provenance": {"site": "site_b", "round": 2},
            "performance": {"metrics": [{"key": "perf/auroc", "value": 0.9}]},
            "xai": [{"key": key, "value": 2.6, "threshold": 2.0, "flagged": True}],
        }
    )
    anchor = metric_anchor(key)
    assert f'href="#ref-{anchor}"' in page
    assert f'id="ref-{anchor}"' in page
    assert definition.name in page and str(definition.direction) in page
    assert 'id="ref-perf-auroc"' in page
    # Each entry says what to do about it.
    assert "counterfactual" in page.split(f'id="ref-{anchor}"', 1)[1]


def test_keys_with_a_class_index_or_phase_find_their_template():
    jaccard = metric_definition("xai/support_jaccard/c1")
    assert jaccard.key == "xai/support_jaccard/c{c}"
    assert jaccard.name_for("xai/support_jaccard/c1").endswith("class 1")
    assert metric_definition("fed/evaluate_ok").name_for("fed/evaluate_ok").count("evaluate") == 1
    assert metric_definition("xai/support_jaccard/cx") is None
    assert metric_definition("fed/nonsense_ok") is None
