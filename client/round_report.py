"""The evaluate step's explanation audit and round report at one site.

Every evaluated round the site explains its fixed audit set (:mod:`client.audit`) and a
public probe set, computes the explanation-quality metrics of METRICS.md, and writes its full
report under ``state_dir/reports/round_XXX/`` (``report.json`` and ``report.html``). What
travels to the server is the numbers plus the redacted report (the full one only where the
site's config sets ``reporting.share_example_images``).

Files this module keeps in the site's state folder (they never leave the site):

- ``reports/explanation_state.json``: last round's support ids and top supports (support
  stability is measured against them, across restarts of the site);
- ``reports/history.json``: every earlier round's ``perf/*`` and ``xai/*`` values (the
  report's trend lines);
- ``reports/sanity.json``: the latest milestone sanity suite (``python -m client sanity``),
  shown in report section 9 when present;
- ``model/latest.pt``: the evaluated global model with its site-local supports (what the
  sanity suite examines).

The probe set is public by construction: SynthCXR images from a fixed seed, the same at every
site, so drift against the global model is comparable across sites.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import subprocess
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from client.audit import (
    ExplanationState,
    audit_intervals,
    audit_metrics,
    audit_why_similar,
    select_audit_set,
)
from client.config import SiteConfig
from client.data import SiteData
from client.site_report import (
    ReportInputs,
    build_site_report,
    gallery_cases,
    write_site_report,
)
from client.synth.params import PRESETS, default_sites
from client.synth.render import Case, render_case
from sic_core import SICModel, explain, save_checkpoint
from sic_core.atomic import atomic_write
from sic_core.calibration import Calibration
from sic_core.metrics import Interval
from sic_core.support import SupportSet

__all__ = [
    "PROBE_IMAGES",
    "PROBE_SEED",
    "RoundFacts",
    "audit_and_report",
    "latest_model_path",
    "public_probe_images",
    "reports_dir",
    "round_report_dir",
    "sanity_path",
]

#: Public probe set: this many SynthCXR images from this seed, identical at every site.
PROBE_IMAGES = 8
PROBE_SEED = 20_261_201


@dataclass(frozen=True)
class RoundFacts:
    """What the evaluate handler knows about the round besides the model and the data.

    Attributes
    ----------
    run_id, server_round
        Flower run id and round.
    config_path
        The site's YAML (hashed into the provenance; the path itself is not reported).
    performance
        This round's ``perf/*`` values.
    reliability
        Reliability-diagram bins of the validation split.
    dp_epsilon, dp_delta
        Privacy spent so far (``0`` and the site's ``target_delta`` without DP).
    released
        What left the site this round, as (what, value) rows.
    intervals
        95 % interval per ``perf/*`` key (``None``: withheld under the small-cell rule).
    calibration
        The round's global calibration (``None``: none was sent; probabilities are raw).
    reliability_raw
        Reliability-diagram bins of the raw probabilities.
    """

    run_id: str
    server_round: int
    config_path: Path
    performance: dict[str, float]
    reliability: list[dict[str, float]]
    dp_epsilon: float
    dp_delta: float
    released: list[tuple[str, object]]
    intervals: dict[str, Interval | None] = field(default_factory=dict)
    calibration: Calibration | None = None
    reliability_raw: list[dict[str, float]] = field(default_factory=list)


def reports_dir(config: SiteConfig) -> Path:
    """``state_dir/reports``: every file of the site's explanation reporting."""
    return Path(config.state_dir) / "reports"


def round_report_dir(config: SiteConfig, server_round: int) -> Path:
    """``state_dir/reports/round_XXX``: the full report of one round."""
    return reports_dir(config) / f"round_{server_round:03d}"


def sanity_path(config: SiteConfig) -> Path:
    """``state_dir/reports/sanity.json``: the latest milestone sanity suite (section 9)."""
    return reports_dir(config) / "sanity.json"


def latest_model_path(config: SiteConfig) -> Path:
    """``state_dir/model/latest.pt``: the last evaluated model with its local supports."""
    return Path(config.state_dir) / "model" / "latest.pt"


@cache
def public_probe_images(size: int, channels: int = 1) -> Tensor:
    """``(PROBE_IMAGES, channels, size, size)`` public SynthCXR images in [0, 1].

    Half are normal, half carry a solid nodule; no marker, no distractor. Drawn from the first
    default synthetic site's acquisition model and the ``default`` preset with
    :data:`PROBE_SEED`, so every site draws exactly the same images.
    """
    spec = default_sites()[0]
    images = []
    for index in range(PROBE_IMAGES):
        label = index % 2
        case = Case(
            index=index,
            label=label,
            lesion_type="solid" if label else "none",
            marker=False,
            distractor=False,
        )
        rendered = render_case(
            case, spec, PRESETS["default"], size=size, seed=PROBE_SEED, site_index=0
        )
        images.append(torch.from_numpy(np.ascontiguousarray(rendered.display)))
    grey = torch.stack(images).float().clamp(0, 1).unsqueeze(1)
    return grey.expand(-1, channels, -1, -1).contiguous()


@cache
def _code_version() -> str:
    """The git commit of the installed code, else the package version."""
    package_dir = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(package_dir), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"git {commit}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"sicfed {metadata.version('sicfed')}"
        except metadata.PackageNotFoundError:
            return "unknown"


def _digest(*parts: bytes) -> str:
    hasher = hashlib.blake2b(digest_size=8)
    for part in parts:
        hasher.update(part)
    return hasher.hexdigest()


def _model_version(model: SICModel, server_round: int) -> str:
    state = model.state_dict()
    weights = b"".join(state[key].detach().cpu().numpy().tobytes() for key in sorted(state))
    return f"round-{server_round}-{_digest(weights)}"


def _read_json(path: Path) -> Any:
    """A JSON file of the site's own (``None`` if absent or unreadable: it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, payload: Any) -> None:
    encoded = json.dumps(payload, indent=1, sort_keys=True).encode()
    atomic_write(path, lambda stream: stream.write(encoded))


def _previous_state(path: Path) -> ExplanationState | None:
    stored = _read_json(path)
    if not isinstance(stored, dict):
        return None
    try:
        return ExplanationState(
            support_ids=[int(i) for i in stored["support_ids"]],
            top_support_ids=[int(i) for i in stored["top_support_ids"]],
        )
    except (KeyError, TypeError, ValueError):
        return None


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def audit_and_report(
    config: SiteConfig,
    data: SiteData,
    model: SICModel,
    global_support: SupportSet,
    support_indices: Tensor,
    facts: RoundFacts,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Explanation metrics of this round, and the report copy that may leave the site.

    Parameters
    ----------
    config, data
        The site's config and data.
    model
        The global weights with the site-local support set (as evaluated).
    global_support
        The global support vectors (for drift on the probe set).
    support_indices
        ``(K,)`` training-split index of each local support (``-1``: the class is absent
        here and the support is the global vector).
    facts
        Round, provenance and performance (see :class:`RoundFacts`).

    Returns
    -------
    metrics, leaving
        ``xai/*`` values (``nan`` where a metric does not apply) and the report to send.
    """
    reports = reports_dir(config)
    train, val = data.split("train"), data.split("val")
    audit = select_audit_set(
        val.images,
        val.labels,
        val.masks,
        size=config.reporting.audit_set_size,
        seed=config.seed,
    )
    global_model = copy.deepcopy(model)
    global_model.set_support(global_support.vectors, global_support.labels)
    state_path = reports / "explanation_state.json"
    explanation = explain(model, audit.images, per_support=False)
    metrics, state = audit_metrics(
        model,
        audit,
        explanation=explanation,
        support_ids=support_indices,
        previous=_previous_state(state_path),
        global_model=global_model,
        probe=public_probe_images(audit.images.shape[-1], audit.images.shape[1]),
        seed=config.seed,
        calibration=facts.calibration,
    )
    # A class absent here keeps its global vector: a blank tile stands in for its image.
    present = support_indices >= 0
    support_images = torch.zeros(support_indices.numel(), *train.images.shape[1:])
    support_images[present] = train.images[support_indices[present]]
    why = audit_why_similar(
        model,
        audit,
        explanation,
        support_images,
        present,
        extra_cases=gallery_cases(explanation, audit.labels),
    )
    metrics.update(why.metrics())

    history_path = reports / "history.json"
    history = [
        entry
        for entry in (_read_json(history_path) or [])
        if isinstance(entry, dict) and entry.get("round", 0) < facts.server_round
    ]
    snapshot = _digest(
        train.images.numpy().tobytes(),
        train.labels.numpy().tobytes(),
        val.images.numpy().tobytes(),
        val.labels.numpy().tobytes(),
    )
    inputs = ReportInputs(
        provenance={
            "federation_run": facts.run_id,
            "round": facts.server_round,
            "site": config.name,
            "model_version": _model_version(model, facts.server_round),
            "code_version": _code_version(),
            "config_hash": _digest(facts.config_path.read_bytes()),
            "data_snapshot": snapshot,
            "audit_set": audit.version,
            "audit_cases": int(audit.labels.numel()),
            "dp_epsilon": facts.dp_epsilon,
            "dp_delta": facts.dp_delta,
        },
        class_names=data.class_names,
        class_counts={
            name: {
                class_name: int((split.labels == c).sum())
                for c, class_name in enumerate(data.class_names)
            }
            for name, split in data.splits.items()
        },
        quarantine=dict(data.quarantine_counts),
        performance=facts.performance,
        metrics=metrics,
        history=[
            {"round": entry.get("round"), **entry.get("perf", {}), **entry.get("xai", {})}
            for entry in history
        ],
        released=facts.released,
        reliability=facts.reliability,
        sanity=_read_json(sanity_path(config)),
        intervals={**facts.intervals, **audit_intervals(model, audit, explanation)},
        reliability_raw=facts.reliability_raw,
        calibration=facts.calibration.to_dict() if facts.calibration is not None else None,
        why=why,
    )
    report = build_site_report(inputs, model, audit, support_images, explanation)
    leaving = write_site_report(
        report,
        round_report_dir(config, facts.server_round),
        share_images=config.reporting.share_example_images,
    )
    _write_json(state_path, asdict(state))
    history.append(
        {
            "round": facts.server_round,
            "perf": {k: _json_number(v) for k, v in facts.performance.items()},
            "xai": {k: _json_number(v) for k, v in metrics.items()},
        }
    )
    _write_json(history_path, history)
    save_checkpoint(
        latest_model_path(config),
        model,
        support_indices=support_indices,
        metadata={
            "round": facts.server_round,
            "run_id": facts.run_id,
            # The probabilities shown this round come from this calibration: it travels
            # with the model.
            "calibration": facts.calibration.to_dict() if facts.calibration else None,
        },
    )
    return metrics, leaving
