"""SynthCXR as a learning problem: easy lesions are learnable, site B's marker is a shortcut."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from client.config import load_site_config
from client.data import SplitData, load_site_data
from client.synth import default_sites, generate_synthcxr


def _small_cnn() -> nn.Module:
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16),
        nn.MaxPool2d(2),
        *block(16, 32),
        nn.MaxPool2d(2),
        *block(32, 64),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 2),
    )


def _train_and_score(train: SplitData, *evaluated: SplitData, epochs: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = _small_cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = (train.images - 0.4) / 0.3, train.labels
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels))
        for start in range(0, len(labels), 32):
            batch = order[start : start + 32]
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimiser.step()
    model.eval()
    scores = []
    with torch.no_grad():
        for split in evaluated:
            probability = torch.softmax(model((split.images - 0.4) / 0.3), dim=1)[:, 1]
            scores.append(roc_auc_score(split.labels.numpy(), probability.numpy()))
    return scores


@pytest.mark.slow
def test_a_small_cnn_learns_easy_lesions_but_takes_site_b_shortcut(tmp_path: Path) -> None:
    sites = default_sites()
    root = generate_synthcxr(tmp_path / "synth", preset="easy", size=64, sites=sites[:2])
    data = {}
    for name in ("site_a", "site_b"):
        config = load_site_config(root / name / "site.yaml")
        data[name] = load_site_data(config.model_copy(update={"state_dir": tmp_path / name}))
    site_a, site_b = data["site_a"], data["site_b"]
    (test_auc,) = _train_and_score(site_a.split("train"), site_a.split("test"))
    assert test_auc > 0.95  # the lesion itself is learnable in a few epochs
    val_auc, shortcut_test_auc = _train_and_score(
        site_b.split("train"), site_b.split("val"), site_b.split("test")
    )
    # The marker alone gives AUC 0.5 + (rho - (1 - rho)) / 2 = 0.95 where it predicts the
    # label (train, val); in test it is independent of the label and the model is at chance.
    assert val_auc > 0.75
    assert shortcut_test_auc < 0.65
