"""SIC against post-hoc explanations of its black-box twin (``--only explainers``).

Per preset (``easy``, ``default``; 64 px) and seed, two models train centrally on the pooled
training sites A, B and C of SynthCXR: SIC (:func:`sic_core.train_sic`) and the black-box twin
(:class:`sic_core.posthoc.PlainCNN`, cross-entropy, AdamW, as the learning benchmark). Every
method of :data:`sic_core.posthoc.METHODS` is then scored by
:func:`sic_core.posthoc.score_method` on one audit set drawn from the pooled validation split
(stratified, :func:`client.audit.select_audit_set`; the marked images are site B's, whose
burned-in marker predicts the label). Each run records every ``posthoc/<method>/<metric>``
value without the prefix, the images explained per second and the explained model's
validation AUROC.

The summary holds, per preset and method, the mean and standard deviation over seeds of each
metric, and per preset and metric the best method with its margin over the runner-up (by the
metric's direction). ``quantus_speed`` times the production metrics (batched PyTorch) against
Quantus' implementations of the same formulas on the same maps (Quantus is a dev dependency;
the section is left out when it is not installed).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from bench.learning_bench import _auroc, _fit, load_regimes
from client.audit import select_audit_set
from client.synth import generate_synthcxr
from sic_core import TrainConfig, create_model, embed_all, train_sic
from sic_core.metrics import gini, mass_lift, pointing_game
from sic_core.model import SICModel
from sic_core.posthoc import METHODS, PlainCNN
from sic_core.posthoc.scoring import AuditCases, ScoringConfig, score_method
from sic_core.support import select_support
from sic_core.wire_posthoc import METHOD_NAMES, PosthocMetric

__all__ = ["DIRECTIONS", "PRESETS", "combine", "registry", "run", "summarise"]

PRESETS = ("easy", "default")
SIZE = 64
#: Epochs per preset: by then both models pass validation AUROC 0.9 on the pooled sites
#: (bench/results/learning.json: easy 0.95 and more from epoch 3; default 0.88-0.99 at
#: epoch 8), and a seed fits a shared 2-core machine.
EPOCHS = {"easy": 5, "default": 8}
AUDIT_SIZE = 32
#: +1: higher is better, -1: lower is better, 0: no direction (read against the others).
DIRECTIONS: dict[str, int] = {
    PosthocMetric.RMA_LIFT: 1,
    PosthocMetric.POINTING_GAME: 1,
    PosthocMetric.DELETION_AUC: -1,
    PosthocMetric.INSERTION_AUC: 1,
    PosthocMetric.DELETION_RANDOM_GAP: 1,
    PosthocMetric.INSERTION_RANDOM_GAP: 1,
    PosthocMetric.RANDOMISATION_RANK_CORR: -1,
    PosthocMetric.MAX_SENSITIVITY: -1,
    PosthocMetric.ARTIFACT_MASS_LIFT: -1,
    PosthocMetric.MARKER_COUNTERFACTUAL_SHIFT: 0,
    PosthocMetric.SECONDS_PER_IMAGE: -1,
    PosthocMetric.COMPLETENESS_MAX_REL_ERR: -1,
    "images_per_s": 1,
}

console = Console()


def _cases(val_images, val_labels, masks, seed: int) -> AuditCases:
    audit = select_audit_set(val_images, val_labels, masks, size=AUDIT_SIZE, seed=seed)
    if "marker" in masks:
        marker = masks["marker"][:, 0].bool()
        marked = marker.flatten(1).any(1)
    else:
        marker = torch.zeros(val_labels.numel(), *val_images.shape[2:], dtype=torch.bool)
        marked = torch.zeros(val_labels.numel(), dtype=torch.bool)
    # Marked cases in validation order, and clean negatives for the paste test.
    marked_index = torch.nonzero(marked).flatten()[:8]
    clean_index = torch.nonzero(~marked & (val_labels == 0)).flatten()[:8]
    return AuditCases(
        images=audit.images,
        labels=audit.labels,
        lesion=audit.lesion,
        marked=val_images[marked_index],
        marker=marker[marked_index],
        clean=val_images[clean_index],
    )


def _seeded(factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _train_models(data, *, epochs: int, seed: int):
    torch.manual_seed(seed)
    twin = PlainCNN()
    _fit(twin, data, epochs=epochs, seed=seed, loss_fn=F.cross_entropy)
    sic = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
    train_sic(sic, data.train.images, data.train.labels, TrainConfig(epochs=epochs, seed=seed))
    support = select_support(
        embed_all(sic, data.train.images), data.train.labels, 2, sic.n_shot, seed=seed
    )
    sic.set_support(support.vectors, support.labels)
    return twin, sic, data.train.images[support.indices.clamp_min(0)], support.labels


def _quantus_speed(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """Seconds of ours and of Quantus for the same localisation and sparseness scores."""
    try:
        import quantus
    except ImportError:
        return {}
    x = maps.unsqueeze(1).numpy()
    a = x.copy()
    s = masks.unsqueeze(1).float().numpy()
    y = torch.ones(maps.shape[0], dtype=torch.long).numpy()
    timings: dict[str, float] = {}

    def clock(function) -> float:
        started = time.perf_counter()
        for _ in range(5):
            function()
        return (time.perf_counter() - started) / 5

    pairs = {
        "pointing_game": (
            lambda: pointing_game(maps, masks, tolerance=0),
            lambda: quantus.PointingGame(disable_warnings=True)(
                model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s
            ),
        ),
        "relevance_mass": (
            lambda: mass_lift(maps, masks),
            lambda: quantus.RelevanceMassAccuracy(disable_warnings=True)(
                model=None, x_batch=x, y_batch=y, a_batch=a, s_batch=s
            ),
        ),
        "sparseness": (
            lambda: gini(maps),
            lambda: quantus.Sparseness(disable_warnings=True)(
                model=None, x_batch=x, y_batch=y, a_batch=a
            ),
        ),
    }
    for name, (ours, theirs) in pairs.items():
        mine, other = clock(ours), clock(theirs)
        timings[f"{name}_ours_s"] = mine
        timings[f"{name}_quantus_s"] = other
        timings[f"{name}_speedup"] = other / max(mine, 1e-9)
    return timings


def run_one(preset: str, seed: int, data, *, config: ScoringConfig) -> list[dict[str, object]]:
    """Train both models for one preset and seed and score every method."""
    started = time.perf_counter()
    twin, sic, support_images, support_labels = _train_models(
        data, epochs=EPOCHS[preset], seed=seed
    )
    aurocs = {
        "twin": _auroc(twin, data.val.images, data.val.labels),
        "sic": _auroc(sic, data.val.images, data.val.labels),
    }
    console.print(
        f"{preset} seed {seed}: trained in {time.perf_counter() - started:.0f} s, "
        f"AUROC SIC {aurocs['sic']:.3f}, twin {aurocs['twin']:.3f}"
    )
    cases = _cases(data.val.images, data.val.labels, data.val.masks, seed)
    fresh_twin = _seeded(PlainCNN, 10_000 + seed)
    fresh_sic = _seeded(lambda: SICModel(sic.config), 10_000 + seed)

    def refresh(randomised) -> None:
        randomised.set_support(embed_all(randomised, support_images), support_labels)

    runs = []
    for method in METHOD_NAMES:
        entry = METHODS[method]
        clock = time.perf_counter()
        if entry.explains == "sic":
            values = score_method(
                method, sic, cases, fresh=fresh_sic, refresh=refresh, config=config
            )
        else:
            values = score_method(
                method, twin, cases, fresh=fresh_twin, reference=cases.images, config=config
            )
        metrics = {key.rsplit("/", 1)[1]: value for key, value in values.items()}
        metrics["images_per_s"] = 1 / max(metrics[PosthocMetric.SECONDS_PER_IMAGE], 1e-12)
        metrics["model_auroc"] = aurocs[entry.explains]
        console.print(
            f"  {method}: {time.perf_counter() - clock:.0f} s, "
            + ", ".join(f"{k} {v:.3g}" for k, v in metrics.items())
        )
        runs.append(
            {"method": method, "preset": preset, "size": SIZE, "seed": seed, "metrics": metrics}
        )
    return runs


def registry() -> dict[str, dict[str, object]]:
    """Every method's library, explained model, settings and cost class (JSON-ready)."""
    return {
        name: {
            "library": entry.library,
            "explains": entry.explains,
            "settings": dict(entry.settings),
            "expensive": entry.expensive,
        }
        for name, entry in METHODS.items()
    }


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarise(runs: list[dict]) -> dict[str, object]:
    """Per preset and method: mean and std per metric; per preset and metric: the winner."""
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run_ in runs:
        grouped.setdefault((run_["preset"], run_["method"]), []).append(run_["metrics"])
    for (preset, method), metrics in grouped.items():
        entry: dict[str, dict[str, float]] = {}
        for key in metrics[0]:
            values = _finite(m.get(key) for m in metrics)
            if not values:
                continue
            entry[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": len(values),
            }
        table.setdefault(preset, {})[method] = entry
    winners: dict[str, dict[str, dict[str, object]]] = {}
    for preset, methods in table.items():
        for metric, direction in DIRECTIONS.items():
            if direction == 0:
                continue
            scored = [
                (stats[metric]["mean"], method)
                for method, stats in methods.items()
                if metric in stats
            ]
            if len(scored) < 2:
                continue
            ranked = sorted(scored, reverse=direction > 0)
            (best, winner), (second, runner_up) = ranked[0], ranked[1]
            winners.setdefault(preset, {})[metric] = {
                "best": winner,
                "value": best,
                "runner_up": runner_up,
                "runner_up_value": second,
                "margin": abs(best - second),
            }
    return {"by_method": table, "winners": winners}


def combine(previous: dict | None, fresh: dict) -> dict[str, object]:
    """``fresh`` merged into an earlier ``explainers.json``: runs of the same method, preset,
    size and seed replaced, the others kept, the summary recomputed over all of them."""

    def key(run_: dict) -> tuple:
        return (run_["preset"], run_["seed"], METHOD_NAMES.index(run_["method"]), run_["size"])

    runs = {key(r): r for r in (previous or {}).get("runs", [])}
    runs.update({key(r): r for r in fresh["runs"]})
    merged = [runs[k] for k in sorted(runs)]
    speed = fresh["summary"].get("quantus_speed") or (previous or {}).get("summary", {}).get(
        "quantus_speed", {}
    )
    summary = {**summarise(merged), "quantus_speed": speed, "methods": registry()}
    return {"runs": merged, "summary": summary}


def run(
    *,
    presets: Iterable[str] = PRESETS,
    seeds: Iterable[int] = (0, 1, 2),
    workdir: Path | None = None,
    config: ScoringConfig | None = None,
) -> dict[str, object]:
    """Every preset and seed: ``{"runs": [...], "summary": {...}}`` (JSON-ready)."""
    config = config or ScoringConfig()
    runs: list[dict] = []
    speed: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sicfed-explainers-", dir=workdir) as scratch:
        for preset in presets:
            root = generate_synthcxr(Path(scratch) / preset, preset=preset, size=SIZE, seed=0)
            data = load_regimes(root)["pooled"]
            for seed in seeds:
                runs += run_one(preset, seed, data, config=config)
            if not speed:
                maps = torch.rand(256, SIZE, SIZE)
                masks = torch.rand(256, SIZE, SIZE) > 0.9
                speed = _quantus_speed(maps, masks)
    summary = {**summarise(runs), "quantus_speed": speed, "methods": registry()}
    return {"runs": runs, "summary": summary}
