"""The per-site explanation report: one JSON document, rendered to self-contained HTML.

The site builds the JSON (it has the pixels) and renders its own full copy; the server
receives the redacted JSON (no image sections) unless the site allows sharing example
images, and ``python -m server report`` re-renders from the stored JSON. Rendering needs the
standard library only: charts are inline SVG, images are ``data:image/png`` URIs already in
the JSON, and no JavaScript is used, so the file opens anywhere, offline.

Sections: 1 provenance, 2 intended use, 3 data sheet, 4 performance,
5 explanation-quality dashboard, 6 how to read an explanation, 7 case gallery, 8 support set,
9 sanity and shortcut checks, 10 what left the site, 11 findings and sign-off.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sic_core.metric_catalog import METRICS, MetricDefinition, metric_anchor, metric_definition

__all__ = [
    "PIXEL_SECTIONS",
    "REPORT_SECTIONS",
    "XAI_THRESHOLDS",
    "crosses_threshold",
    "json_safe",
    "redact",
    "render_federation_summary_html",
    "render_report_html",
]

#: Dashboard thresholds (also logged as MLflow params ``xai_threshold/<metric>``), read from
#: the metric catalog: a value above its threshold is marked, except where the catalog says
#: ``flagged_when="below"`` (localisation lift).
XAI_THRESHOLDS: dict[str, float] = {
    m.key: m.threshold for m in METRICS if m.threshold is not None and m.key.startswith("xai/")
}


def crosses_threshold(key: str, value: float) -> bool:
    """Whether ``value`` of metric ``key`` crosses its dashboard threshold (``nan``: no)."""
    definition = metric_definition(key)
    return definition is not None and definition.crosses(value)


REPORT_SECTIONS = (
    ("provenance", "1. Provenance"),
    ("intended-use", "2. Intended use and limitations"),
    ("data-sheet", "3. Site data sheet"),
    ("performance", "4. Performance"),
    ("explanation-quality", "5. Explanation-quality dashboard"),
    ("how-to-read", "6. How to read an SIC explanation"),
    ("case-gallery", "7. Case gallery"),
    ("support-set", "8. Support set"),
    ("sanity", "9. Sanity and shortcut checks"),
    ("released", "10. What left the site this round"),
    ("findings", "11. Open findings and sign-off"),
)

#: JSON keys whose content carries pixels of the site's images.
PIXEL_SECTIONS = ("gallery", "support_set")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #dde3ee;padding-bottom:.2em;
margin-top:1.8em}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #dde3ee;
padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f6fb}
.flag{color:#b00020;font-weight:600}.ok{color:#1b7f3b}.muted{color:#66708a}
.case{display:grid;grid-template-columns:auto auto minmax(0,1fr) auto;gap:1em;
align-items:start;border:1px solid #dde3ee;padding:.6em;margin:.6em 0}
.case img{width:160px;height:160px;image-rendering:pixelated;border:1px solid #ccd}
.case svg{max-width:100%;height:auto}.supports{display:flex;flex-direction:column;gap:.4em}
.supports img{width:72px;height:72px}.why{font-size:.8em;color:#33405a;max-width:220px;
text-align:left}.thumbs{display:flex;flex-wrap:wrap;gap:1em}
.thumbs img{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ccd}
figure{margin:0;text-align:center;font-size:.85em}
.note{background:#f7f9fc;border-left:4px solid #6b8cce;padding:.5em 1em}
.scroll{overflow-x:auto;max-width:100%}body.wide{max-width:none}
code.key{font-size:.8em;color:#66708a}dl.reference dt{font-weight:600;margin-top:.6em}
dl.reference dd{margin:.2em 0 0 1.2em}
.summary th{font-size:.8em;vertical-align:bottom}.summary td{white-space:nowrap;padding:.2em .4em;
font-size:.9em}.summary .flag{white-space:normal}
"""


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: object, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return _escape("-" if value is None else value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return _escape(value)


def _interval_cell(ci: object) -> str:
    """A "95% CI" cell: ``[low, high]`` from a pair, a note (``"n<10"``) as it is, else "-"."""
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(v) for v in ci):
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    return ci if isinstance(ci, str) else "-"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    head = "".join(f"<th>{_escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_number(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key_values(mapping: Mapping[str, object]) -> str:
    return _table(["field", "value"], [(k, v) for k, v in mapping.items()])


def _bar_chart(bars: Sequence[tuple[str, float]], *, width: int = 420) -> str:
    """Horizontal signed bars (evidence per support, bias, logit) as inline SVG."""
    if not bars:
        return ""
    scale = max(abs(v) for _, v in bars) or 1.0
    row, label_w = 18, 120
    half = (width - label_w) / 2
    parts = [
        f'<svg width="{width}" height="{row * len(bars) + 4}" '
        f'viewBox="0 0 {width} {row * len(bars) + 4}" role="img" '
        f'aria-label="evidence bars"><line x1="{label_w + half}" y1="0" x2="{label_w + half}" '
        f'y2="{row * len(bars)}" stroke="#999"/>'
    ]
    for i, (label, value) in enumerate(bars):
        length = abs(value) / scale * (half - 4)
        x = label_w + half if value >= 0 else label_w + half - length
        colour = "#c0392b" if value >= 0 else "#2e6fd8"
        y = i * row + 2
        parts.append(
            f'<text x="0" y="{y + 12}" font-size="11">{_escape(label)}</text>'
            f'<rect x="{x:.1f}" y="{y}" width="{length:.1f}" height="{row - 5}" fill="{colour}"/>'
            f'<text x="{label_w + half + (6 if value < 0 else -6)}" y="{y + 12}" font-size="10" '
            f'text-anchor="{"start" if value < 0 else "end"}">{value:.3f}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _axis_label(x: float, y: float, text: str, anchor: str = "middle") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="9" fill="#66708a" '
        f'text-anchor="{anchor}">{_escape(text)}</text>'
    )


def _line_chart(
    series: Sequence[float | None],
    band: Sequence[Sequence[float]] | None = None,
    *,
    rounds: Sequence[object] | None = None,
    width: int = 220,
    height: int = 64,
) -> str:
    """One metric over rounds, with the other sites' band (min-max) behind it, on labelled axes.

    The y axis is labelled with the lowest and highest value drawn (line or band), the x axis
    with the first and last round (``rounds``, one per entry of ``series``; without it, the
    evaluation's position: 1 is the oldest).
    """
    points = [(i, v) for i, v in enumerate(series) if _is_number(v)]
    band_points = [b for b in (band or []) if len(b) == 2 and all(_is_number(x) for x in b)]
    values = [v for _, v in points] + [x for b in band_points for x in b]
    if not values:
        return '<span class="muted">no data</span>'
    low, high = min(values), max(values)
    steps = max(len(series) - 1, 1)
    # Plot area: room on the left for the value labels, below for the round labels.
    left, right, top, bottom = 54, width - 6, 6, height - 14

    def x_of(i: int) -> float:
        return left + i * (right - left) / steps

    def y_of(v: float) -> float:
        if high == low:  # a flat series runs through the middle, under its one label
            return (top + bottom) / 2
        return bottom - (v - low) / (high - low) * (bottom - top)

    def xy(i: int, v: float) -> str:
        return f"{x_of(i):.1f},{y_of(v):.1f}"

    labels = list(rounds) if rounds is not None and len(rounds) == len(series) else None
    first, last = (labels[0], labels[-1]) if labels else (1, len(series))
    prefix = "round " if labels else "eval "
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="trend over rounds">',
        f'<path d="M{left},{top}V{bottom}H{right}" fill="none" stroke="#99a"/>',
        _axis_label(left, height - 2, f"{prefix}{first}", "start"),
    ]
    if high == low:
        parts.append(_axis_label(left - 3, (top + bottom) / 2 + 3, _number(high, 3), "end"))
    else:
        parts.append(_axis_label(left - 3, top + 7, _number(high, 3), "end"))
        parts.append(_axis_label(left - 3, bottom, _number(low, 3), "end"))
    if len(series) > 1:
        parts.append(_axis_label(right, height - 2, f"{prefix}{last}", "end"))
    if band and len(band_points) == len(band):
        upper = [xy(i, b[1]) for i, b in enumerate(band)]
        lower = [xy(i, b[0]) for i, b in reversed(list(enumerate(band)))]
        parts.append(f'<polygon points="{" ".join(upper + lower)}" fill="#dde7f7"/>')
    if points:
        parts.append(
            f'<polyline points="{" ".join(xy(i, v) for i, v in points)}" fill="none" '
            'stroke="#1d2330" stroke-width="1.5"/>'
        )
        parts.extend(
            f'<circle cx="{x_of(i):.1f}" cy="{y_of(v):.1f}" r="1.8" fill="#1d2330"/>'
            for i, v in points
        )
    parts.append("</svg>")
    return "".join(parts)


def _reliability_diagram(bins: Sequence[Mapping[str, float]], *, size: int = 180) -> str:
    """Accuracy per confidence bin as bars over the diagonal, on axes ticked at 0, 0.5 and 1."""
    if not bins:
        return '<p class="muted">no reliability data</p>'
    left, top, below = 36, 8, 32
    width, height = left + size + 10, top + size + below
    bottom = top + size
    parts = [
        f'<svg width="{width}" height="{height}" role="img" aria-label="reliability diagram">',
        f'<line x1="{left}" y1="{bottom}" x2="{left + size}" y2="{top}" stroke="#bbb" '
        'stroke-dasharray="4"/>',
    ]
    for i, entry in enumerate(bins):
        accuracy = entry.get("accuracy")
        if accuracy is None or not math.isfinite(accuracy):
            continue
        # Bins carry their confidence edges (empty bins are left out); else equal widths.
        lower = entry.get("lower", i / len(bins))
        upper = entry.get("upper", (i + 1) / len(bins))
        bar = accuracy * size
        parts.append(
            f'<rect x="{left + lower * size + 1:.1f}" y="{bottom - bar:.1f}" '
            f'width="{max((upper - lower) * size - 2, 1):.1f}" '
            f'height="{bar:.1f}" fill="#6b8cce" opacity="0.8"/>'
        )
    parts.append(f'<path d="M{left},{top}V{bottom}H{left + size}" fill="none" stroke="#556"/>')
    for tick in (0.0, 0.5, 1.0):
        x, y = left + tick * size, bottom - tick * size
        parts.append(
            f'<path d="M{x:.1f},{bottom}v4M{left},{y:.1f}h-4" stroke="#556"/>'
            + _axis_label(x, bottom + 13, f"{tick:g}")
            + _axis_label(left - 6, y + 3, f"{tick:g}", "end")
        )
    parts.append(
        _axis_label(left + size / 2, bottom + 27, "confidence (predicted class)")
        + f'<text x="10" y="{top + size / 2:.1f}" font-size="9" fill="#66708a" '
        f'text-anchor="middle" transform="rotate(-90 10 {top + size / 2:.1f})">accuracy</text>'
        "</svg>"
    )
    return "".join(parts)


def _reliability_section(performance: Mapping[str, Any]) -> str:
    """The reliability diagram; before and after calibration side by side when both exist."""
    calibrated = _reliability_diagram(performance.get("reliability", []))
    if "reliability_raw" not in performance:
        return "<p>Reliability diagram (accuracy per confidence bin):</p>" + calibrated
    raw = _reliability_diagram(performance.get("reliability_raw", []))
    return (
        "<p>Reliability diagrams (accuracy per confidence bin), before and after the "
        "federated calibration of the probabilities:</p>"
        f'<div class="thumbs"><figure>{raw}<figcaption>raw (sigmoids normalised over '
        f"classes)</figcaption></figure><figure>{calibrated}<figcaption>calibrated"
        "</figcaption></figure></div>"
    )


def _image(data_uri: str | None, alt: str) -> str:
    if not data_uri or not data_uri.startswith("data:image/png;base64,"):
        return ""
    return f'<img src="{_escape(data_uri)}" alt="{_escape(alt)}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_escape(title)}</h2>{body}</section>'


def _metric_cell(key: str) -> str:
    """A metric's plain-language name over its key, linked to its reference entry below."""
    definition = metric_definition(key)
    if definition is None:
        return f"<code>{_escape(key)}</code>"
    return (
        f'<a href="#ref-{metric_anchor(key)}">{_escape(definition.name_for(key))}</a>'
        f'<br><code class="key">{_escape(key)}</code>'
    )


def _direction_cell(key: str) -> str:
    definition = metric_definition(key)
    return _escape(definition.direction) if definition is not None else "-"


def _metric_reference(keys: Iterable[str]) -> str:
    """The catalog entries of ``keys`` (once each), as the targets of the dashboard's links."""
    seen: dict[str, MetricDefinition] = {}
    for key in keys:
        definition = metric_definition(key)
        if definition is not None:
            seen.setdefault(definition.key, definition)
    if not seen:
        return ""
    entries = []
    for definition in seen.values():
        rule = definition.rule()
        flag = f" Raises <code>{_escape(definition.flag)}</code>." if definition.flag else ""
        entries.append(
            f'<dt id="ref-{metric_anchor(definition.key)}">{_escape(definition.name)} '
            f"<code>{_escape(definition.key)}</code></dt><dd>{_escape(definition.meaning)}"
            f"<br><b>Formula:</b> {_escape(definition.formula)}"
            f"<br><b>Range:</b> {_escape(definition.value_range)}; "
            f"{_escape(definition.direction)}."
            + (f"<br><b>Threshold:</b> {_escape(rule)}.{flag}" if rule or flag else "")
            + f"<br><b>If out of range:</b> {_escape(definition.action)}</dd>"
        )
    return (
        '<h3 id="metric-reference">What these metrics mean</h3>'
        '<p class="muted">The same entries as the metrics reference of the sicfed '
        "documentation (Reference, Metrics).</p>"
        f'<dl class="reference">{"".join(entries)}</dl>'
    )


def _dashboard(rows: Sequence[Mapping[str, Any]]) -> str:
    header = [
        "metric",
        "direction",
        "value",
        "95% CI",
        "threshold",
        "change",
        "rank among sites",
        "trend vs sites' band",
    ]
    cells = []
    for row in rows:
        key = str(row.get("key", ""))
        flagged = bool(row.get("flagged"))
        value = f'<span class="{"flag" if flagged else "ok"}">{_number(row.get("value"))}</span>'
        cells.append(
            "<tr>"
            f'<td>{_metric_cell(key)}</td><td class="muted">{_direction_cell(key)}</td>'
            f"<td>{value}</td><td>{_escape(_interval_cell(row.get('ci')))}</td>"
            f"<td>{_number(row.get('threshold'))}</td><td>{_number(row.get('change'))}</td>"
            f"<td>{_number(row.get('rank'))}</td>"
            f"<td>{_line_chart(row.get('trend', []), row.get('band'), rounds=row.get('rounds'))}"
            "</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(cells)}</tbody></table>"


def _performance_table(metrics: Sequence[Mapping[str, Any]]) -> str:
    """This round's performance, each metric named, with its direction, CI and last round."""
    rows = "".join(
        f"<tr><td>{_metric_cell(str(m.get('key', '')))}</td>"
        f'<td class="muted">{_direction_cell(str(m.get("key", "")))}</td>'
        f"<td>{_number(m.get('value'))}</td><td>{_escape(_interval_cell(m.get('ci')))}</td>"
        f"<td>{_number(m.get('previous'))}</td></tr>"
        for m in metrics
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("metric", "direction", "this round", "95% CI", "last round")
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _gallery(cases: Sequence[Mapping[str, Any]]) -> str:
    """One row per case: input, overlay, evidence bars, and its top supports in a column."""
    blocks = []
    for case in cases:
        bars = [(b["label"], float(b["value"])) for b in case.get("evidence", [])]
        supports = "".join(
            f"<figure>{_image(s.get('png'), 'support sample')}"
            f"{_image(s.get('map_png'), 'support map')}"
            f"<figcaption>{_escape(s.get('label', ''))}: e={_number(s.get('evidence'))}"
            f"{_why(s.get('why'))}</figcaption></figure>"
            for s in case.get("supports", [])
        )
        blocks.append(
            '<div class="case">'
            f"<figure>{_image(case.get('input_png'), 'input')}"
            "<figcaption>input</figcaption></figure>"
            f"<figure>{_image(case.get('overlay_png'), 'contribution overlay')}"
            "<figcaption>signed contributions</figcaption></figure>"
            f"<div><b>{_escape(case.get('title', ''))}</b><br>{_bar_chart(bars)}</div>"
            f'<div class="supports"><span class="muted">top supports</span>{supports}</div></div>'
        )
    return "".join(blocks) or '<p class="muted">no cases</p>'


def _why(why: object, *, prefix: str = "") -> str:
    """A support's "why similar" line and a small signed bar per property."""
    if not isinstance(why, Mapping):
        return ""
    influence = why.get("influence", {})
    bars = [(str(p), float(v)) for p, v in influence.items() if _is_number(v)]
    width, row, label_w = 150, 11, 58
    half = (width - label_w) / 2
    parts = [
        f'<svg width="{width}" height="{row * len(bars) + 2}" role="img" '
        f'aria-label="why similar"><line x1="{label_w + half}" y1="0" x2="{label_w + half}" '
        f'y2="{row * len(bars)}" stroke="#999"/>'
    ]
    for i, (label, value) in enumerate(bars):
        length = min(abs(value), 1.0) * (half - 2)
        x = label_w + half if value >= 0 else label_w + half - length
        colour = "#c0392b" if value >= 0 else "#2e6fd8"
        parts.append(
            f'<text x="0" y="{i * row + 9}" font-size="9">{_escape(label)}</text>'
            f'<rect x="{x:.1f}" y="{i * row + 1}" width="{length:.1f}" height="{row - 3}" '
            f'fill="{colour}"/>'
        )
    parts.append("</svg>")
    return (
        f'<div class="why">{_escape(prefix)}{_escape(why.get("line", ""))}</div>' + "".join(parts)
        if bars
        else ""
    )


def _support_gallery(supports: Sequence[Mapping[str, Any]]) -> str:
    figures = "".join(
        f"<figure>{_image(s.get('png'), 'support')}{_image(s.get('map_png'), 'support map')}"
        f"<figcaption>{_escape(s.get('label', ''))}"
        f"{_why(s.get('why'), prefix='over the audit set: ')}</figcaption></figure>"
        for s in supports
    )
    return f'<div class="thumbs">{figures}</div>' if figures else ""


_HOW_TO_READ = (
    "<p>The model scores each class as a <b>sum of similarities</b> between this image and a "
    "few example cases of that class from this hospital (the support samples), plus a fixed "
    "bias. The bars show each example case's share of the score. The map shows <b>where in "
    "the image</b> each similarity comes from: red pixels add to the score, blue pixels take "
    "from it. The numbers add up exactly: the pixels of a class map sum to that class's score "
    "minus the bias.</p>"
)


def render_report_html(report: Mapping[str, Any]) -> str:
    """Render a site report (see the module docstring) to one self-contained HTML page.

    Parameters
    ----------
    report
        The report JSON as a mapping. Image sections are shown only if present (a redacted
        report has none and says so).
    """
    provenance = report.get("provenance", {})
    site = provenance.get("site", "site")
    round_ = provenance.get("round", "?")
    redacted = bool(report.get("redacted"))
    performance = report.get("performance", {})
    completeness = report.get("completeness_example", {})
    how_to_read = _HOW_TO_READ + (
        f'<p class="note">Completeness check on the audit set: largest relative error '
        f"{_number(completeness.get('max_rel_err'))} (a hard gate below 1e-4).</p>"
        if completeness
        else ""
    )
    pixel_note = (
        '<p class="muted">Redacted copy: images stay at the site (its configuration does not '
        "allow sharing example images).</p>"
    )
    data_sheet = report.get("data_sheet", {})
    bodies = {
        "provenance": _key_values(provenance),
        "intended-use": f"<p>{_escape(report.get('intended_use', ''))}</p>"
        + "".join(f"<li>{_escape(item)}</li>" for item in report.get("limitations", [])),
        "data-sheet": _table(
            ["split", *data_sheet.get("class_names", [])],
            [[split, *counts] for split, counts in data_sheet.get("class_counts", {}).items()],
        )
        + _table(["quarantine reason", "files"], sorted(data_sheet.get("quarantine", {}).items())),
        "performance": _performance_table(performance.get("metrics", []))
        + _reliability_section(performance),
        "explanation-quality": _dashboard(report.get("xai", []))
        + _metric_reference(
            [str(m.get("key", "")) for m in report.get("xai", [])]
            + [str(m.get("key", "")) for m in performance.get("metrics", [])]
        ),
        "how-to-read": how_to_read,
        "case-gallery": pixel_note if redacted else _gallery(report.get("gallery", [])),
        "support-set": (pixel_note if redacted else _support_gallery(report.get("support_set", [])))
        + _key_values(report.get("support_stability", {})),
        "sanity": _key_values(report.get("sanity", {})),
        "released": _table(["what", "value"], report.get("released", [])),
        "findings": "".join(f"<p>{_escape(f)}</p>" for f in report.get("findings", []))
        + f"<p>Sign-off: {_escape(report.get('sign_off', '________________'))}</p>",
    }
    sections = "".join(_section(a, t, bodies[a]) for a, t in REPORT_SECTIONS)
    title = f"SIC explanation report: {site}, round {round_}"
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_escape(title)}</h1>{sections}</body></html>"
    )


def _breakable(name: str) -> str:
    """A metric key as a table header that may wrap after ``/`` and ``_`` (narrow columns)."""
    return _escape(name).replace("/", "/<wbr>").replace("_", "_<wbr>")


def _header_title(key: str) -> str:
    """A ``title`` attribute naming a metric column in plain words (shown on hover)."""
    definition = metric_definition(key)
    if definition is None:
        return ""
    return f' title="{_escape(definition.name_for(key))}: {_escape(definition.direction)}"'


def _summary_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A table of pre-rendered cells that scrolls inside the page instead of overflowing it."""
    head = "".join(f"<th{_header_title(h)}>{_breakable(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f'<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


#: Shown inside another column's cell (the AUROC's interval, the ECE's raw value), so the
#: round tables keep their width.
_MERGED_COLUMNS = frozenset({"perf/auroc_ci_low", "perf/auroc_ci_high", "perf/ece_raw"})


def _summary_cell(row: Mapping[str, Any], column: str) -> str:
    """A summary value; the AUROC with its 95 % interval ("no CI" where it was withheld)
    and the calibrated ECE with the raw one, each on a second line."""
    cell = _number(row.get(column))
    if not _is_number(row.get(column)):
        return cell
    if column == "perf/auroc":
        low, high = row.get("perf/auroc_ci_low"), row.get("perf/auroc_ci_high")
        note = _interval_cell([low, high]) if _is_number(low) and _is_number(high) else "no CI"
    elif column == "perf/ece" and _is_number(row.get("perf/ece_raw")):
        note = f"raw {_number(row.get('perf/ece_raw'), 3)}"
    else:
        return cell
    return f'{cell}<br><span class="muted">{_escape(note)}</span>'


def render_federation_summary_html(summary: Mapping[str, Any]) -> str:
    """The federation summary (``server.reports.federation_summary``) as one HTML page.

    One table per round (a row per site: outlier flags first, then performance and
    explanation quality), then one trend line per metric and site over the rounds. The page
    uses the window's full width; a table wider still scrolls inside it, so no column is cut
    off.
    """
    columns = [c for c in summary.get("columns", []) if c not in _MERGED_COLUMNS]
    rows = list(summary.get("rows", []))
    title = f"SIC federation summary: {summary.get('run', '')}"
    flagged = summary.get("flagged_sites_last_round", [])
    parts = [
        f"<p>Sites flagged in the last round: "
        f'<span class="{"flag" if flagged else "ok"}">'
        f"{_escape(', '.join(flagged) or 'none')}</span>. Flags: drift robust z-score "
        "above 3 among the sites, completeness above its hard gate, artifact mass lift above "
        "its threshold.</p>",
        _key_values(summary.get("thresholds", {})),
    ]
    for server_round in summary.get("rounds", []):
        in_round = [row for row in rows if row.get("round") == server_round]
        parts.append(f"<h3>Round {_escape(server_round)}</h3>")
        parts.append(
            _summary_table(
                ["site", "flags", *columns],
                [
                    [
                        _escape(row["site"]),
                        f'<span class="flag">{_escape(", ".join(row.get("flags", [])))}</span>'
                        if row.get("flags")
                        else '<span class="muted">none</span>',
                        *(_summary_cell(row, c) for c in columns),
                    ]
                    for row in in_round
                ],
            )
        )
    sites = sorted({row["site"] for row in rows})
    trends = []
    for column in columns:
        charts = []
        for site in sites:
            mine = [row for row in rows if row["site"] == site]
            charts.append(
                _line_chart(
                    [row.get(column) for row in mine], rounds=[r["round"] for r in mine], width=180
                )
            )
        trends.append([_breakable(column), *charts])
    parts.append("<h3>Trends over rounds</h3>" + _summary_table(["metric", *sites], trends))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{_escape(title)}</title><style>{_CSS}</style></head><body class="wide">'
        f"<h1>{_escape(title)}</h1>{''.join(parts)}</body></html>"
    )


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def redact(report: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``report`` without any section that carries pixels."""
    kept = {k: v for k, v in report.items() if k not in PIXEL_SECTIONS}
    kept["redacted"] = True
    return kept
