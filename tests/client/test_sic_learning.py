"""SIC learns SynthCXR easy on a CPU and its positive evidence sits on the lesion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.config import load_site_config
from client.data import load_site_data
from client.synth import generate_synthcxr
from sic_core import TrainConfig, create_model, explain, train_sic
from sic_core.metrics import auroc, mass_lift


@pytest.mark.slow
def test_small_encoder_learns_synthcxr_easy(tmp_path: Path) -> None:
    generate_synthcxr(tmp_path / "synth", preset="easy", size=64, scale=1.0, seed=0)
    data = load_site_data(load_site_config(tmp_path / "synth" / "site_a" / "site.yaml"))
    train, val = data.split("train"), data.split("val")
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
    # The contract: TrainConfig's defaults, eight epochs, from scratch.
    history = train_sic(model, train.images, train.labels, TrainConfig(epochs=8))
    assert not history.collapsed

    result = explain(model, val.images, target=torch.ones_like(val.labels))
    assert auroc(result.logits, val.labels) >= 0.9
    positives = (val.labels == 1) & (result.predicted == 1)
    lesion = val.masks["lesion"][:, 0].float()
    lift = mass_lift(result.class_maps[:, 1][positives], lesion[positives])
    assert float(lift.nanmedian()) >= 2
