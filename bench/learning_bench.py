"""How fast SIC learns SynthCXR, against a plain CNN of the same shape (``--only learning``).

For each preset, image size, training regime (``site_a`` alone, or the ``pooled`` training
sites A, B and C) and seed, three models train for the preset's epoch budget:

- ``cnn``: :class:`sic_core.posthoc.PlainCNN`, the plain CNN with the small B-cos encoder's
  widths and strides, BatchNorm + ReLU, global max pool, linear head, cross-entropy (the
  anchor every ratio is taken against; the same network is SIC's black-box twin);
- ``bcos_linear``: the small B-cos encoder, global max pool and a ``BcosLinear`` head, BCE;
- ``sic``: the SIC model trained by :func:`sic_core.train_sic` with its default recipe.

Each run records validation AUROC per epoch (pooled validation split of its regime), the
epochs to validation AUROC 0.9, the best AUROC, the final model's AUROC on the held-out site
D, and (B-cos models) the median lesion lift of the nodule contribution maps on correctly
detected validation nodules. Ratios, not seconds, so that the figures hold on a busy
machine: ``sic_vs_cnn_auroc_ratio`` (mean best AUROC) and ``sic_vs_cnn_epochs_to_0p9_ratio``
(median epochs to 0.9; a run that never gets there counts as budget + 1) per preset, at
the demo's size from ``site_a`` alone.

Runs train on the CPU by default; ``device`` (``python -m bench --only learning --device
cuda``) puts the models on a GPU (the data stays in host memory and goes over in batches, as
:func:`sic_core.train_sic` expects), and each run records where it trained, since a GPU's
kernels do not reproduce a CPU run's numbers exactly.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from bcos.modules import BcosLinear
from rich.console import Console
from torch import Tensor, nn

from client.config import load_site_config
from client.data import SplitData, load_site_data
from client.synth import generate_synthcxr
from sic_core import TrainConfig, create_model, explain, train_sic
from sic_core.encoders import SmallBcosCNN
from sic_core.explanations import explanation_mode
from sic_core.head import sic_loss
from sic_core.metrics import auroc, mass_lift
from sic_core.model import encode_input
from sic_core.posthoc.twin import PlainCNN

MODELS = ("cnn", "bcos_linear", "sic")
REGIMES = ("site_a", "pooled")
PRESETS = ("easy", "default", "hard")
#: Epoch budget per preset (the targets: easy within 3 CNN epochs, default within 10).
EPOCHS = {"easy": 8, "default": 12, "hard": 16}
DEMO_SIZE = 64
TARGET_AUROC = 0.9
TRAINING_SITES = ("site_a", "site_b", "site_c")
HELD_OUT_SITE = "site_d"

console = Console()


@dataclass(frozen=True)
class RunRecord:
    """One model trained on one preset, size, regime and seed."""

    model: str
    preset: str
    size: int
    regime: str
    seed: int
    val_auroc: list[float]
    epochs_to_0p9: int | None
    best_auroc: float
    held_out_auroc: float
    lesion_lift: float | None
    #: Where it trained; runs recorded before the field existed all trained on the CPU.
    device: str = "cpu"


@dataclass(frozen=True)
class Regime:
    """Training and validation tensors of one regime, and the held-out site's images."""

    train: SplitData
    val: SplitData
    held_out: SplitData


class BcosLinearClassifier(nn.Module):
    """The small B-cos encoder, global max pool and a ``BcosLinear`` head (exact maps)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.encoder = SmallBcosCNN(2 * in_channels)
        self.head = BcosLinear(self.encoder.num_features, num_classes, b=2)
        self.explaining = False  # read by explanation_mode

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_encoded(encode_input(x))

    def forward_encoded(self, encoded: Tensor) -> Tensor:
        return self.head(self.encoder(encoded).amax(dim=(2, 3)))


def _fit(
    model: nn.Module,
    data: Regime,
    *,
    epochs: int,
    seed: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> list[float]:
    device = _device_of(model)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = data.train.images, data.train.labels
    curve = []
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(labels.shape[0], generator=generator).split(32):
            loss = loss_fn(model(images[batch].to(device)), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        curve.append(_auroc(model, data.val.images, data.val.labels))
    return curve


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _auroc(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    model.eval()
    device = _device_of(model)
    return auroc(torch.cat([model(chunk.to(device)) for chunk in images.split(256)]), labels)


def _nodule_lift(maps: Tensor, predicted: Tensor, data: Regime) -> float | None:
    detected = (data.val.labels == 1) & (predicted == 1)
    if not bool(detected.any()) or "lesion" not in data.val.masks:
        return None
    lesion = data.val.masks["lesion"][:, 0].float()
    lift = float(mass_lift(maps[detected], lesion[detected]).nanmedian())
    return None if math.isnan(lift) else lift


def _linear_head_maps(model: BcosLinearClassifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """Predictions and exact nodule contribution maps ``sum_c x~_c dz_1/dx~_c`` (on the CPU)."""
    model.eval()
    with explanation_mode(model):  # type: ignore[arg-type]
        encoded = encode_input(images.to(_device_of(model))).requires_grad_(True)
        logits = model.forward_encoded(encoded)
        (gradient,) = torch.autograd.grad(logits[:, 1].sum(), encoded)
    return logits.detach().argmax(1).cpu(), (encoded * gradient).sum(1).detach().cpu()


def train_one(
    model_name: str,
    data: Regime,
    *,
    epochs: int,
    seed: int,
    device: torch.device | None = None,
) -> RunRecord:
    """Train ``model_name`` on ``data`` (host memory) for ``epochs`` on ``device`` (default:
    the CPU) and score it; preset, size and regime are filled in by the caller."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    lift: float | None = None
    if model_name == "cnn":
        model: nn.Module = PlainCNN().to(device)
        curve = _fit(model, data, epochs=epochs, seed=seed, loss_fn=F.cross_entropy)
    elif model_name == "bcos_linear":
        model = BcosLinearClassifier().to(device)
        curve = _fit(model, data, epochs=epochs, seed=seed, loss_fn=sic_loss)
        predicted, maps = _linear_head_maps(model, data.val.images)
        lift = _nodule_lift(maps, predicted, data)
    elif model_name == "sic":
        model = create_model("bcos_cnn_small", in_channels=1, num_classes=2).to(device)
        history = train_sic(
            model,
            data.train.images,
            data.train.labels,
            TrainConfig(epochs=epochs, seed=seed),
            val_images=data.val.images,
            val_labels=data.val.labels,
        )
        curve = [float(record.val_auroc or math.nan) for record in history.epochs]
        result = explain(model, data.val.images.to(device), target=torch.ones_like(data.val.labels))
        lift = _nodule_lift(result.class_maps[:, 1], result.predicted, data)
    else:
        raise ValueError(f"model: expected one of {MODELS}, got {model_name!r}")
    reached = [epoch for epoch, value in enumerate(curve, start=1) if value >= TARGET_AUROC]
    return RunRecord(
        model=model_name,
        preset="",
        size=0,
        regime="",
        seed=seed,
        val_auroc=[round(value, 4) for value in curve],
        epochs_to_0p9=reached[0] if reached else None,
        best_auroc=max(curve),
        held_out_auroc=_auroc(model, data.held_out.images, data.held_out.labels),
        lesion_lift=lift,
        device=device.type,
    )


def _concat(splits: Iterable[SplitData]) -> SplitData:
    splits = list(splits)
    shared = [name for name in splits[0].masks if all(name in split.masks for split in splits)]
    return SplitData(
        images=torch.cat([split.images for split in splits]),
        labels=torch.cat([split.labels for split in splits]),
        masks={name: torch.cat([split.masks[name] for split in splits]) for name in shared},
        has_mask={name: torch.cat([split.has_mask[name] for split in splits]) for name in shared},
        patient_ids=[pid for split in splits for pid in split.patient_ids],
        files=[file for split in splits for file in split.files],
    )


def load_regimes(root: Path) -> dict[str, Regime]:
    """The ``site_a`` and ``pooled`` regimes of a SynthCXR folder."""
    sites = {}
    for name in (*TRAINING_SITES, HELD_OUT_SITE):
        config = load_site_config(root / name / "site.yaml")
        sites[name] = load_site_data(config)
    held_out = _concat(sites[HELD_OUT_SITE].split(split) for split in ("train", "val", "test"))
    return {
        "site_a": Regime(sites["site_a"].split("train"), sites["site_a"].split("val"), held_out),
        "pooled": Regime(
            _concat(sites[name].split("train") for name in TRAINING_SITES),
            _concat(sites[name].split("val") for name in TRAINING_SITES),
            held_out,
        ),
    }


def _epochs_score(records: list[RunRecord], budget: int) -> float:
    return statistics.median(
        record.epochs_to_0p9 if record.epochs_to_0p9 is not None else budget + 1
        for record in records
    )


def summarise(records: list[RunRecord]) -> dict[str, object]:
    """Per preset/size/regime/model medians and means, and the SIC-vs-CNN ratios."""
    summary: dict[str, dict] = {}
    ratios_auroc: dict[str, float] = {}
    ratios_epochs: dict[str, float] = {}
    groups: dict[tuple[str, int, str, str], list[RunRecord]] = {}
    for record in records:
        groups.setdefault((record.preset, record.size, record.regime, record.model), []).append(
            record
        )
    for (preset, size, regime, model), runs in groups.items():
        lifts = [run.lesion_lift for run in runs if run.lesion_lift is not None]
        summary.setdefault(preset, {}).setdefault(str(size), {}).setdefault(regime, {})[model] = {
            "seeds": len(runs),
            "reached_0p9": sum(run.epochs_to_0p9 is not None for run in runs),
            "median_epochs_to_0p9": _epochs_score(runs, EPOCHS[preset]),
            "mean_best_auroc": statistics.fmean(run.best_auroc for run in runs),
            "mean_held_out_auroc": statistics.fmean(run.held_out_auroc for run in runs),
            "median_lesion_lift": statistics.median(lifts) if lifts else None,
        }
    for preset, sizes in summary.items():
        anchor = sizes.get(str(DEMO_SIZE), {}).get("site_a", {})
        if "sic" in anchor and "cnn" in anchor:
            ratios_auroc[preset] = (
                anchor["sic"]["mean_best_auroc"] / anchor["cnn"]["mean_best_auroc"]
            )
            ratios_epochs[preset] = (
                anchor["sic"]["median_epochs_to_0p9"] / anchor["cnn"]["median_epochs_to_0p9"]
            )
    return {
        "summary": summary,
        "sic_vs_cnn_auroc_ratio": ratios_auroc,
        "sic_vs_cnn_epochs_to_0p9_ratio": ratios_epochs,
    }


def combine(previous: dict[str, object] | None, fresh: dict[str, object]) -> dict[str, object]:
    """A fresh result merged into an earlier ``learning.json``: runs of the same model,
    preset, size, regime and seed are replaced, the others kept, and the summary and ratios
    recomputed over all of them (so presets and sizes can be measured in separate sessions)."""

    def key(run: dict) -> tuple:
        return (run["model"], run["preset"], run["size"], run["regime"], run["seed"])

    runs = {key(run): run for run in (previous or {}).get("runs", [])}  # type: ignore[union-attr]
    runs.update({key(run): run for run in fresh["runs"]})  # type: ignore[union-attr]
    merged = [RunRecord(**run) for run in sorted(runs.values(), key=key)]
    return {
        "epochs": {**(previous or {}).get("epochs", {}), **fresh["epochs"]},  # type: ignore[dict-item]
        **summarise(merged),
        "runs": [asdict(record) for record in merged],
    }


def run(
    *,
    presets: Iterable[str] = PRESETS,
    sizes: Iterable[int] = (DEMO_SIZE, 128),
    regimes: Iterable[str] = REGIMES,
    models: Iterable[str] = MODELS,
    seeds: Iterable[int] = (0, 1, 2),
    workdir: Path | None = None,
    device: torch.device | None = None,
) -> dict[str, object]:
    """Train every combination and return the records and the summary (JSON-ready)."""
    records: list[RunRecord] = []
    with tempfile.TemporaryDirectory(prefix="sicfed-learning-", dir=workdir) as scratch:
        for preset in presets:
            for size in sizes:
                root = generate_synthcxr(
                    Path(scratch) / f"{preset}-{size}", preset=preset, size=size, seed=0
                )
                data = load_regimes(root)
                for regime in regimes:
                    for model in models:
                        for seed in seeds:
                            record = train_one(
                                model,
                                data[regime],
                                epochs=EPOCHS[preset],
                                seed=seed,
                                device=device,
                            )
                            record = replace(record, preset=preset, size=size, regime=regime)
                            console.print(
                                f"{preset} {size}px {regime} {model} seed {seed}: "
                                f"epochs to 0.9 {record.epochs_to_0p9}, "
                                f"best {record.best_auroc:.3f}, "
                                f"held-out {record.held_out_auroc:.3f}, "
                                f"lift {record.lesion_lift}"
                            )
                            records.append(record)
    return {
        "epochs": {preset: EPOCHS[preset] for preset in presets},
        **summarise(records),
        "runs": [asdict(record) for record in records],
    }
