"""The small encoder learns a lesion task on a CPU and its evidence sits on the lesion."""

from __future__ import annotations

import pytest
import torch

from sic_core import TrainConfig, create_model, explain, train_sic
from sic_core.metrics import auroc


@pytest.mark.slow
def test_small_encoder_learns_disc_lesions_and_points_at_them(disc_images) -> None:
    torch.manual_seed(0)
    images, labels, _ = disc_images(400, 48, seed=0)
    test_images, test_labels, test_masks = disc_images(200, 48, seed=1)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
    train_sic(model, images, labels, TrainConfig(epochs=6, warmup_epochs=0.5))

    result = explain(model, test_images, target=torch.ones_like(test_labels))
    assert auroc(result.logits, test_labels) >= 0.9

    positives = (test_labels == 1) & (result.predicted == 1)
    assert positives.sum() >= 50
    relevance = result.class_maps[:, 1].clamp_min(0)[positives]
    lesion = test_masks[positives, 0]
    mass_in_lesion = (relevance * lesion).sum(dim=(1, 2)) / relevance.sum(dim=(1, 2))
    lift = mass_in_lesion / lesion.mean(dim=(1, 2))
    assert lift.median() >= 5
