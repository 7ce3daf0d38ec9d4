"""Explanation-quality evaluation: its share of a demo round, and explanations per second.

- ``explain_share_of_round``: a demo-sized federation (three SynthCXR sites at 64 px, scale
  1.0, two local epochs, warm launchers and tuned polling as ``python -m server demo``) runs
  on loopback; per round, the slowest site's audit-and-report time (``xai.seconds``: every
  ``xai/*`` metric plus the report) divided by the round's wall time; median over the rounds
  after the first. Sites run in parallel, so the slowest site's audit is what the round waits
  for.
- ``explanations_per_s``: images explained per second by :func:`sic_core.explain` (every
  support's and every class's map: one backward pass per support vector) for the demo model,
  batch 64, in this process; ``class_explanations_per_s`` the same for class maps only (one
  backward pass per class), as the per-round audit computes them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from sic_core import create_model, explain

__all__ = ["explanations_per_s", "run"]

ROUNDS = 3
DEMO_SETTINGS = {"image-size": 64, "local-epochs": 2, "batch-size": 32, "anchor-rounds": ROUNDS}


def explanations_per_s(
    device: torch.device, *, size: int = 64, batch: int = 64, per_support: bool = True
) -> float:
    """Images explained per second by the demo encoder at ``size`` px.

    ``per_support=True``: the full explanation (every support's map and every class map);
    ``False``: class maps only, as the per-round audit computes them.
    """
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2).to(device)
    labels = torch.tensor([0, 0, 0, 1, 1, 1], device=device)
    model.set_support(torch.rand(6, model.config.proj_dim, device=device), labels)
    images = torch.rand(batch, 1, size, size, device=device)
    explain(model, images, per_support=per_support)  # warm-up
    started = time.perf_counter()
    repeats = 3
    for _ in range(repeats):
        explain(model, images, per_support=per_support)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * batch / (time.perf_counter() - started)


def run(workdir: Path) -> dict[str, float]:
    """Both figures plus the parts of the share (``round_wall_demo_s``, ``xai_seconds_demo``)."""
    # Deployment imports (Flower, MLflow) stay here: the GPU run needs explanations_per_s only.
    from bench.round_bench import federate, slowest
    from server.commands.demo import ensure_synthcxr

    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sites"
    ensure_synthcxr(data, preset="easy", size=64, scale=1.0, seed=0, log_path=workdir / "synth.log")
    rounds = federate(
        workdir / "federation", data, tuned=True, settings={**DEMO_SETTINGS, "rounds": ROUNDS}
    )[1:]
    walls = [entry["seconds"] for entry in rounds]
    audits = [slowest(entry, "evaluate", "xai.seconds") for entry in rounds]
    return {
        "explain_share_of_round": statistics.median(
            audit / wall for audit, wall in zip(audits, walls, strict=True)
        ),
        "round_wall_demo_s": statistics.median(walls),
        "xai_seconds_demo": statistics.median(audits),
        "explanations_per_s": explanations_per_s(torch.device("cpu")),
        "class_explanations_per_s": explanations_per_s(torch.device("cpu"), per_support=False),
    }
