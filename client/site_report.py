"""The site's explanation report for one round: JSON with embedded PNGs, rendered to HTML.

The site has the pixels, so it builds the full report and keeps it under
``state_dir/reports/round_XXX/``; what it sends to the server is the redacted JSON unless its
config sets ``reporting.share_example_images: true``.

Small cells: a class count from 1 to 9 can identify patients, and every split's total leaves
the site anyway (``num-examples`` of each reply, ``audit_cases``), so hiding that one count
alone would not hide it: total minus the other classes gives it back. A split with such a
count therefore shows none of its class counts (:func:`suppress_small_cells`).
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from client.audit import AuditSet, AuditWhy
from sic_core import Explanation, SICModel, explain, explain_support
from sic_core.atomic import atomic_write
from sic_core.metrics import Interval, format_interval
from sic_core.report import XAI_THRESHOLDS, crosses_threshold, json_safe, redact, render_report_html
from sic_core.why_similar import PROPERTIES, why_line

__all__ = [
    "SMALL_CELL",
    "ReportInputs",
    "build_site_report",
    "gallery_cases",
    "overlay_png",
    "png_data_uri",
    "small_cell",
    "suppress_small_cells",
    "write_site_report",
]

SMALL_CELL = 10
GALLERY_CASES = 4
GALLERY_ERRORS = 2
DISPLAY_SIZE = 160

INTENDED_USE = (
    "Research and audit of a federated, interpretable-by-design classifier. Not a medical "
    "device; predictions and explanations must not be used for diagnosis."
)
LIMITATIONS = [
    "Support samples change between rounds until the model converges: show clinicians "
    "support samples only from a frozen, approved model version.",
    "Read every explanation metric against the spread between two ordinary training runs, "
    "not against fixed thresholds.",
]


#: What a data-sheet cell shows when its split holds a small cell.
SUPPRESSED = "suppressed"


def small_cell(count: int) -> int | str:
    """A count as shown in reports: ``"<10"`` below :data:`SMALL_CELL`."""
    return f"<{SMALL_CELL}" if 0 < count < SMALL_CELL else count


def suppress_small_cells(counts: Sequence[int]) -> list[int | str]:
    """One split's class counts as the data sheet shows them.

    If any count lies in ``1 .. SMALL_CELL - 1``, every count of the split (zeros too) shows
    as :data:`SUPPRESSED`: the split's total is known outside the site, so with one cell
    hidden and the others shown, ``total - sum(others)`` would reveal it, and a cell marked
    ``"<10"`` beside cells marked otherwise still tells which class is small. Otherwise the
    counts are shown as they are.

    Parameters
    ----------
    counts
        Images per class of one split.
    """
    if any(small_cell(count) != count for count in counts):
        return [SUPPRESSED] * len(counts)
    return list(counts)


def png_data_uri(rgb: np.ndarray) -> str:
    """``(H, W, 3|4)`` uint8 image as a ``data:image/png;base64,...`` URI, upscaled for display."""
    image = Image.fromarray(rgb)
    image = image.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _grey(image: Tensor) -> np.ndarray:
    grey = image.mean(dim=0).clamp(0, 1).numpy()
    return (np.stack([grey] * 3, axis=-1) * 255).astype(np.uint8)


def overlay_png(
    image: Tensor, contribution: Tensor, scale: float, contour: Tensor | None = None
) -> str:
    """Signed contributions over the image on a fixed symmetric scale ``[-scale, scale]``.

    Red adds to the score, blue takes from it; opacity grows with ``|R| / scale``. The same
    ``scale`` is used for every case of a report so maps are comparable.
    """
    base = _grey(image).astype(np.float32) / 255
    relative = (contribution / max(scale, 1e-12)).clamp(-1, 1).numpy()[..., None]
    red, blue = np.array([0.85, 0.1, 0.1]), np.array([0.1, 0.3, 0.9])
    colour = np.where(relative >= 0, red, blue)
    alpha = np.abs(relative) ** 0.7
    blended = base * (1 - alpha) + colour * alpha
    if contour is not None:
        mask = contour.bool().numpy()
        edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1]
        edge |= mask & ~np.pad(mask, 1)[1:-1, 2:] | mask & ~np.pad(mask, 1)[1:-1, :-2]
        blended[edge] = [1.0, 0.85, 0.0]
    return png_data_uri((blended * 255).astype(np.uint8))


@dataclass(frozen=True)
class ReportInputs:
    """What a site knows when it writes its round report.

    Attributes
    ----------
    provenance
        Federation run, round, site pseudonym, model version, git SHA, config hash, data
        snapshot hash, audit-set version, DP spent.
    class_names, class_counts, quarantine
        Data sheet (aggregates only).
    performance
        Metric key to value for this round (``perf/*``).
    metrics
        Explanation metrics for this round (``xai/*``).
    history
        Earlier rounds' ``perf/*`` and ``xai/*`` values at this site, oldest first, each with
        its ``"round"`` (the x axis of the trend lines).
    released
        What left the site this round: (what, value) rows.
    reliability, reliability_raw
        Reliability-diagram bins of the calibrated and of the raw probabilities.
    intervals
        95 % interval per ``perf/*`` key (``None``: withheld under the small-cell rule).
    calibration
        The round's calibration parameters (``Calibration.to_dict``), if any.
    why
        "Why similar" of the audit cases against the supports, if measured.
    """

    provenance: Mapping[str, object]
    class_names: Sequence[str]
    class_counts: Mapping[str, Mapping[str, int]]
    quarantine: Mapping[str, int]
    performance: Mapping[str, float]
    metrics: Mapping[str, float]
    history: Sequence[Mapping[str, float]]
    released: Sequence[tuple[str, object]]
    reliability: Sequence[Mapping[str, float]] = ()
    sanity: Mapping[str, object] | None = None
    intervals: Mapping[str, Interval | None] | None = None
    reliability_raw: Sequence[Mapping[str, float]] = ()
    calibration: Mapping[str, object] | None = None
    why: AuditWhy | None = None


def _previous(history: Sequence[Mapping[str, float]], key: str) -> float | None:
    return history[-1].get(key) if history else None


def _change(value: float, previous: float | None) -> float | None:
    if previous is None or not all(math.isfinite(v) for v in (value, previous)):
        return None
    return value - previous


def gallery_cases(result: Explanation, labels: Tensor) -> list[int]:
    """The audit cases the gallery shows: the first ones, then the most confident errors."""
    wrong = result.predicted != labels
    confidence = result.logits.max(dim=1).values
    fixed = list(range(min(GALLERY_CASES, labels.numel())))
    # The most confident errors among the cases not already shown: each case appears once.
    others = torch.nonzero(wrong).flatten()
    others = others[~torch.isin(others, torch.tensor(fixed, dtype=torch.long))]
    return fixed + others[confidence[others].argsort(descending=True)][:GALLERY_ERRORS].tolist()


def _gallery(
    result: Explanation,
    model: SICModel,
    audit: AuditSet,
    support_images: Tensor,
    class_names: Sequence[str],
    why: AuditWhy | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    wrong = result.predicted != audit.labels
    cases = gallery_cases(result, audit.labels)
    scale = float(result.target_maps().abs().flatten().quantile(0.995)) or 1.0
    support_explanation = explain_support(model, support_images)
    support_scale = float(support_explanation.maps.abs().flatten().quantile(0.995)) or 1.0
    labels_k = model.support_labels.tolist()

    def support_label(k: int) -> str:
        return f"{class_names[labels_k[k]]} #{k}"

    # Each support's image and map are encoded once, then shared by every case that shows it.
    support_pngs = [png_data_uri(_grey(image)) for image in support_images]
    support_map_pngs = [
        overlay_png(image, support_map, support_scale)
        for image, support_map in zip(support_images, support_explanation.maps, strict=True)
    ]

    gallery = []
    for i in cases:
        target = int(result.predicted[i])
        evidence = result.evidence[i]
        bars = [
            {"label": support_label(k), "value": float(evidence[k])}
            for k in range(evidence.numel())
        ] + [{"label": "bias", "value": result.bias}]
        in_target = [k for k in range(evidence.numel()) if labels_k[k] == target]
        top = sorted(in_target, key=lambda k: -float(evidence[k]))[:3]
        gallery.append(
            {
                "title": (
                    f"case {i}: true {class_names[int(audit.labels[i])]}, predicted "
                    f"{class_names[target]} (logit {float(result.logits[i, target]):.3f})"
                    + (" — error" if wrong[i] else "")
                ),
                "input_png": png_data_uri(_grey(audit.images[i])),
                "overlay_png": overlay_png(
                    audit.images[i],
                    result.class_maps[i, target],
                    scale,
                    audit.lesion[i] if audit.lesion[i].any() else None,
                ),
                "evidence": bars,
                "supports": [
                    {
                        "label": support_label(k),
                        "evidence": float(evidence[k]),
                        "png": support_pngs[k],
                        "map_png": support_map_pngs[k],
                        **_why_entry(why.of(i, k) if why is not None else None),
                    }
                    for k in top
                ],
            }
        )
    support_set = [
        {
            "label": support_label(k),
            "png": support_pngs[k],
            "map_png": support_map_pngs[k],
            **_why_entry(_profile(why, k)),
        }
        for k in range(support_images.shape[0])
    ]
    return gallery, support_set


def _profile(why: AuditWhy | None, support: int) -> dict[str, float] | None:
    """A support's mean influence over the audit set (``None``: not measured)."""
    if why is None or bool(why.profiles[support].isnan().any()):
        return None
    return {p: float(v) for p, v in zip(PROPERTIES, why.profiles[support], strict=True)}


def _why_entry(influence: Mapping[str, float] | None) -> dict[str, Any]:
    """The ``why`` field of a support in the report: one line and the five influences."""
    if influence is None:
        return {}
    values = [influence[p] for p in PROPERTIES]
    return {"why": {"line": why_line(values), "influence": dict(influence)}}


def build_site_report(
    inputs: ReportInputs,
    model: SICModel,
    audit: AuditSet,
    support_images: Tensor,
    explanation: Explanation | None = None,
) -> dict[str, Any]:
    """The full (pixel-carrying) report JSON of one round at one site.

    Parameters
    ----------
    inputs
        Numbers and provenance (see :class:`ReportInputs`).
    model
        The evaluated model with its site-local support set.
    audit
        The audit set (gallery cases are its first cases plus the most confident errors).
    support_images
        ``(K, C, S, S)`` the site's training image behind each support vector.
    explanation
        ``explain(model, audit.images)`` if the caller has it already.
    """
    result = (
        explanation if explanation is not None else explain(model, audit.images, per_support=False)
    )
    gallery, support_set = _gallery(
        result, model, audit, support_images, inputs.class_names, inputs.why
    )
    history = list(inputs.history)
    intervals = inputs.intervals or {}
    xai_rows = []
    for key, value in inputs.metrics.items():
        xai_rows.append(
            {
                "key": key,
                "value": value,
                **(_interval_entry(intervals[key]) if key in intervals else {}),
                "threshold": XAI_THRESHOLDS.get(key),
                "change": _change(value, _previous(history, key)),
                "trend": [h.get(key) for h in history] + [value],
                "rounds": [h.get("round") for h in history] + [inputs.provenance.get("round")],
                "flagged": crosses_threshold(key, value),
            }
        )
    metrics = [
        {
            "key": key,
            "value": value,
            "previous": _previous(history, key),
            **(_interval_entry(intervals[key]) if key in intervals else {}),
        }
        for key, value in inputs.performance.items()
    ]
    counts = {
        split: suppress_small_cells([per_class.get(name, 0) for name in inputs.class_names])
        for split, per_class in inputs.class_counts.items()
    }
    findings = [
        f"{row['key']} = {row['value']:.4g} crosses its threshold {row['threshold']}"
        for row in xai_rows
        if row["flagged"]
    ] or ["No metric crossed its threshold this round."]
    return {
        "provenance": dict(inputs.provenance),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "data_sheet": {
            "class_names": list(inputs.class_names),
            "class_counts": counts,
            "quarantine": dict(inputs.quarantine),
        },
        "performance": {
            "metrics": metrics,
            "reliability": list(inputs.reliability),
            **({"reliability_raw": list(inputs.reliability_raw)} if inputs.reliability_raw else {}),
            **({"calibration": dict(inputs.calibration)} if inputs.calibration else {}),
        },
        "xai": xai_rows,
        "completeness_example": {"max_rel_err": inputs.metrics.get("xai/completeness_max_rel_err")},
        "gallery": gallery,
        "support_set": support_set,
        "support_stability": {
            k: v for k, v in inputs.metrics.items() if "jaccard" in k or "agreement" in k
        },
        "sanity": dict(inputs.sanity or {"status": "not run this round (milestone suite)"}),
        "released": [[what, value] for what, value in inputs.released],
        "findings": findings,
        "redacted": False,
    }


def _interval_entry(interval: Interval | None) -> dict[str, Any]:
    """``ci``: ``[low, high]``, or the small-cell note where the interval is withheld."""
    if interval is None:
        return {"ci": format_interval(None)}
    return {"ci": interval.to_list(), "ci_method": interval.method}


def write_site_report(
    report: Mapping[str, Any], directory: Path, *, share_images: bool
) -> dict[str, Any]:
    """Write ``report.json`` and ``report.html`` (full, site-local) under ``directory``.

    Returns the copy that may leave the site: the full report if ``share_images``, else the
    redacted one.
    """
    report = json_safe(report)
    for name, text in (
        ("report.json", json.dumps(report, indent=1, allow_nan=False)),
        ("report.html", render_report_html(report)),
    ):
        encoded = text.encode()
        atomic_write(directory / name, lambda stream, data=encoded: stream.write(data))
    return report if share_images else redact(report)
