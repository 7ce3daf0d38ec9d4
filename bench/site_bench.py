"""What one message costs at a site, and how fast the site trains, on this machine's device.

Flower starts a new ClientApp process for every message (three per round per site), so
whatever a handler needs before it can compute is paid three times a round. Each message
here runs in a process of its own (:mod:`bench.site_message`) on a SynthCXR site
(``site_a`` at scale 0.25: 140 training and 30 validation images; 64 px on a CPU, 128 px on
a GPU), launched the way ``python -m client join`` launches it by default (forked from the
site's warm launcher) and the way Flower does (a fresh interpreter). Figures are medians
over :data:`MESSAGES` messages of each kind, after one that fills the site's data cache.

- ``site_message_overhead_s``: process start (fork) to the handler's first computation, as
  a site runs today: the project's imports, the site config and ``compute.device``, the
  device's initialisation (a CUDA context: a forked child cannot inherit one), the cached
  data, and the model built on the device. Its parts: ``site_message_imports_s``,
  ``site_message_config_s``, ``site_message_device_init_s``, ``site_message_cache_s``,
  ``site_message_model_s``; ``site_message_overhead_cold_s`` is the same for a fresh
  interpreter (Flower's default, ``join --cold``).
- ``site_train_images_per_s``: images per second of one round of local SIC training
  (:func:`client.training.train_locally`, two epochs, batch 32) on the device;
  ``site_support_s``, ``site_evaluate_s`` and ``site_audit_s`` time the other two messages'
  work (support statistics; evaluation; the explanation audit and report).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

__all__ = ["MESSAGES", "run"]

#: Messages timed per launch kind (after one that fills the cache).
MESSAGES = 3
_EPOCHS = 2
_PARTS = ("imports", "config", "device_init", "cache", "model")
_ROOT = Path(__file__).resolve().parent.parent


def _message(site_yaml: Path, launch: str) -> dict[str, float]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.site_message",
            "--site",
            str(site_yaml),
            "--launch",
            launch,
            "--epochs",
            str(_EPOCHS),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=_ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.site_message --launch {launch} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    workdir: Path, device: torch.device | None = None, *, messages: int = MESSAGES
) -> dict[str, float]:
    """Measure the figures of this module's docstring on ``device`` (default: the CPU)."""
    device = device or torch.device("cpu")
    size = 128 if device.type == "cuda" else 64
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "sites"
    if not (data / "manifest.json").is_file():
        # The site's own generator (no coordinator packages needed on a GPU machine).
        synth = ["synth", "--out", str(data), "--preset", "easy", "--size", str(size)]
        subprocess.run(
            [sys.executable, "-m", "client", *synth, "--scale", "0.25", "--seed", "0"],
            check=True,
            capture_output=True,
            cwd=_ROOT,
        )
    site_yaml = data / "site_a" / "site.yaml"
    config = yaml.safe_load(site_yaml.read_text())
    config["compute"] = {"device": str(device)}
    site_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    _message(site_yaml, "cold")  # decodes the images into the site's cache
    warm = [_message(site_yaml, "warm") for _ in range(messages)]
    cold = [_message(site_yaml, "cold") for _ in range(messages)]

    def median(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    figures = {
        "site_message_overhead_s": median(warm, "overhead_s"),
        **{f"site_message_{part}_s": median(warm, f"{part}_s") for part in _PARTS},
        "site_message_overhead_cold_s": median(cold, "overhead_s"),
        "site_message_imports_cold_s": median(cold, "imports_s"),
        "site_train_images_per_s": statistics.median(
            row["train_images"] / row["train_s"] for row in warm + cold
        ),
        "site_support_s": median(warm + cold, "support_s"),
        "site_evaluate_s": median(warm + cold, "evaluate_s"),
        "site_audit_s": median(warm + cold, "audit_s"),
    }
    return figures
