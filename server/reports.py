"""The server's side of explanation reporting: outlier flags, cross-site context, summaries.

Sites send their round report (redacted unless they share example images) with their
evaluation. The server

- flags outlier sites per round (:func:`outlier_flags`): cross-site drift with a robust
  z-score above :data:`DRIFT_ROBUST_Z` (among at least three sites), completeness above its
  hard gate, shortcut (artifact) mass lift above its threshold;
- adds what only it knows to each site's dashboard (:func:`with_site_context`): the site's
  rank among the sites and the other sites' band (min-max) for every round of its trends;
- writes every report as JSON and self-contained HTML under
  ``<run log dir>/reports/round_XXX/<site>/`` and a federation summary (one row per site per
  round: performance, explanation quality, flags) as ``reports/federation_summary.{json,html}``.

:mod:`server.tracking` puts the same files into MLflow; ``python -m server report`` rebuilds
them from MLflow alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from server.checkpoint import atomic_write_bytes
from sic_core.metrics import robust_z
from sic_core.report import (
    XAI_THRESHOLDS,
    crosses_threshold,
    json_safe,
    render_federation_summary_html,
    render_report_html,
)
from sic_core.wire import XaiMetric

__all__ = [
    "DRIFT_ROBUST_Z",
    "FLAG_KEYS",
    "SERVER_FLAGS_FINDING",
    "SUMMARY_KEYS",
    "federation_summary",
    "outlier_flags",
    "threshold_params",
    "with_site_context",
    "write_federation_summary",
    "write_site_reports",
]

#: A site whose drift to the global model has a robust z-score above this is flagged.
DRIFT_ROBUST_Z = 3.0
#: Sites needed before a robust z-score means anything (the MAD of two values is zero).
MIN_SITES_FOR_Z = 3

#: Outlier flags per site and round (MLflow metrics in the site's child run, 0 or 1).
FLAG_KEYS = ("flag/drift_outlier", "flag/completeness", "flag/artifact_mass_lift")

#: How the finding that lists a site's outlier flags begins (one such line per report).
SERVER_FLAGS_FINDING = "Server outlier flags this round: "

#: Per-site values shown in the federation summary (MLflow keys).
SUMMARY_KEYS = (
    "perf/auroc",
    "perf/auroc_ci_low",
    "perf/auroc_ci_high",
    "perf/balanced_accuracy",
    "perf/ece",
    "perf/ece_raw",
    str(XaiMetric.COMPLETENESS),
    str(XaiMetric.RMA_LIFT),
    str(XaiMetric.POINTING_GAME),
    str(XaiMetric.DELETION_AUC),
    str(XaiMetric.INSERTION_AUC),
    str(XaiMetric.TOP_SUPPORT_AGREEMENT),
    str(XaiMetric.DRIFT_TO_GLOBAL),
    str(XaiMetric.ARTIFACT_MASS_LIFT),
    str(XaiMetric.MARKER_COUNTERFACTUAL_SHIFT),
)


def threshold_params() -> dict[str, str]:
    """Dashboard thresholds as MLflow params ``xai_threshold/<metric>``."""
    params = {
        f"xai_threshold/{key.removeprefix('xai/')}": str(value)
        for key, value in XAI_THRESHOLDS.items()
    }
    params["xai_threshold/drift_robust_z"] = str(DRIFT_ROBUST_Z)
    return params


def _finite(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def outlier_flags(metrics_by_site: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, int]]:
    """Flags (0/1 per :data:`FLAG_KEYS`) of every site for one round.

    Parameters
    ----------
    metrics_by_site
        Each evaluated site's ``xai/*`` values this round (``nan``: not applicable).
    """
    flags = {
        site: {
            "flag/drift_outlier": 0,
            "flag/completeness": int(
                crosses_threshold(
                    str(XaiMetric.COMPLETENESS), metrics.get(XaiMetric.COMPLETENESS, math.nan)
                )
            ),
            "flag/artifact_mass_lift": int(
                crosses_threshold(
                    str(XaiMetric.ARTIFACT_MASS_LIFT),
                    metrics.get(XaiMetric.ARTIFACT_MASS_LIFT, math.nan),
                )
            ),
        }
        for site, metrics in metrics_by_site.items()
    }
    drifts = {
        site: value
        for site, metrics in metrics_by_site.items()
        if (value := _finite(metrics.get(XaiMetric.DRIFT_TO_GLOBAL))) is not None
    }
    if len(drifts) >= MIN_SITES_FOR_Z:
        scores = robust_z(torch.tensor(list(drifts.values())))
        for site, score in zip(drifts, scores.tolist(), strict=True):
            flags[site]["flag/drift_outlier"] = int(score > DRIFT_ROBUST_Z)
    return flags


def with_site_context(
    report: Mapping[str, Any],
    site: str,
    values_by_round: Mapping[int, Mapping[str, Mapping[str, float]]],
    flags: Mapping[str, int],
) -> dict[str, Any]:
    """``report`` with its dashboard ranked among the sites and banded by the other sites.

    Parameters
    ----------
    report
        The site's report JSON for the latest round in ``values_by_round``.
    site
        The site's pseudonym.
    values_by_round
        round -> site -> metric -> value, for every round up to this one.
    flags
        This round's outlier flags of the site (added to its findings, replacing a flags
        line the report already carries, so applying this twice changes nothing).
    """
    rounds = sorted(values_by_round)
    latest = values_by_round[rounds[-1]] if rounds else {}
    rows = []
    for row in report.get("xai", []):
        key = row.get("key", "")
        mine = _finite(row.get("value"))
        others = [
            v for s, m in latest.items() if s != site if (v := _finite(m.get(key))) is not None
        ]
        rank = None
        if mine is not None:
            # Rank 1 is the largest value: every flagged metric but localisation is "larger
            # is worse", and the dashboard shows the threshold beside it.
            rank = 1 + sum(v > mine for v in others)
        band = []
        for server_round in rounds[-len(row.get("trend", [])) :] if row.get("trend") else []:
            values = [
                v
                for s, m in values_by_round[server_round].items()
                if s != site
                if (v := _finite(m.get(key))) is not None
            ]
            band.append([min(values), max(values)] if values else [math.nan, math.nan])
        rows.append({**row, "rank": rank, "band": band or None})
    raised = [name.removeprefix("flag/") for name, value in flags.items() if value]
    # A report read back from MLflow (``server report``) already carries the server's line.
    findings = [
        finding
        for finding in report.get("findings", [])
        if not str(finding).startswith(SERVER_FLAGS_FINDING)
    ]
    if raised:
        findings.append(f"{SERVER_FLAGS_FINDING}{', '.join(raised)}.")
    return {**report, "xai": rows, "findings": findings, "flags": dict(flags)}


def _write_json_and_html(directory: Path, stem: str, payload: Any, html: str) -> list[Path]:
    paths = [directory / f"{stem}.json", directory / f"{stem}.html"]
    atomic_write_bytes(paths[0], json.dumps(json_safe(payload), indent=1).encode())
    atomic_write_bytes(paths[1], html.encode())
    return paths


def write_site_reports(
    directory: Path, server_round: int, reports: Mapping[str, Mapping[str, Any]]
) -> dict[str, Path]:
    """Write each site's report under ``directory/round_XXX/<site>/``; return the folders."""
    folders = {}
    for site, report in sorted(reports.items()):
        folder = directory / f"round_{server_round:03d}" / site
        _write_json_and_html(folder, "report", report, render_report_html(json_safe(report)))
        folders[site] = folder
    return folders


def federation_summary(
    run: str,
    values_by_round: Mapping[int, Mapping[str, Mapping[str, float]]],
    flags_by_round: Mapping[int, Mapping[str, Mapping[str, int]]],
) -> dict[str, Any]:
    """The federation summary: one row per round and site.

    Parameters
    ----------
    run
        The federation run's name.
    values_by_round
        round -> site -> metric -> value.
    flags_by_round
        round -> site -> flag -> 0/1.
    """
    rows: list[dict[str, Any]] = []
    for server_round in sorted(values_by_round):
        for site, metrics in sorted(values_by_round[server_round].items()):
            flags = flags_by_round.get(server_round, {}).get(site, {})
            rows.append(
                {
                    "round": server_round,
                    "site": site,
                    **{key: _finite(metrics.get(key)) for key in SUMMARY_KEYS},
                    "flags": sorted(k.removeprefix("flag/") for k, v in flags.items() if v),
                }
            )
    last = max(values_by_round, default=0)
    flagged = sorted({row["site"] for row in rows if row["round"] == last and row["flags"]})
    return {
        "run": run,
        "rounds": sorted(values_by_round),
        "columns": list(SUMMARY_KEYS),
        "rows": rows,
        "flagged_sites_last_round": flagged,
        "thresholds": threshold_params(),
    }


def write_federation_summary(directory: Path, summary: Mapping[str, Any]) -> list[Path]:
    """``directory/federation_summary.{json,html}``."""
    return _write_json_and_html(
        directory, "federation_summary", summary, render_federation_summary_html(summary)
    )
