"""train_sic's from-scratch recipe: measured switch to episodic supports, anchored term,
collapse detection and recovery."""

from __future__ import annotations

import math

import pytest
import torch

from sic_core import TrainConfig, create_model, train_sic
from sic_core.errors import ConfigError
from sic_core.support import anchor_support
from sic_core.training import EpochRecord, TrainHistory, embedding_separation


def _collapse(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Give every projection unit the mean pooled feature as weights: every embedding then
    has equal, positive coordinates, so all embeddings point the same way."""
    with torch.no_grad():
        pooled = model.embedder.encoder(model.encode(images)).amax(dim=(2, 3)).mean(0)
        weight = model.embedder.projection.linear.weight
        weight.copy_(pooled.expand_as(weight))


def test_a_fresh_encoder_starts_anchored_and_separation_is_measured(disc_images) -> None:
    images, labels, _ = disc_images(48, 32, seed=0)
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, width=8)
    history = train_sic(model, images, labels, TrainConfig(epochs=2, batch_size=16))
    first = history.epochs[0]
    assert first.phase == "anchored"
    assert first.separation < 0.9
    assert not math.isnan(history.final_mean_cosine)


@pytest.mark.parametrize(("switch_auroc", "expected"), [(None, "anchored"), (0.0, "episodic")])
def test_switch_auroc_none_keeps_anchors_and_zero_starts_episodic(
    disc_images, switch_auroc: float | None, expected: str
) -> None:
    images, labels, _ = disc_images(32, 32, seed=0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, width=8)
    config = TrainConfig(epochs=2, batch_size=16, switch_auroc=switch_auroc)
    history = train_sic(model, images, labels, config)
    assert [record.phase for record in history.epochs] == [expected, expected]


def test_a_collapsed_model_is_measured_as_collapsed_and_trained_against_anchors(
    disc_images,
) -> None:
    images, labels, _ = disc_images(48, 32, seed=0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, width=8)
    _collapse(model, images)
    anchors = anchor_support(2, model.n_shot, model.config.proj_dim)
    separation = embedding_separation(model, images, labels, anchors)
    assert separation.mean_cosine > 0.999
    # Tiny differences in direction may still rank the classes (AUROC well above 0.5), so
    # the switch also requires embeddings that are not collapsed.
    config = TrainConfig(epochs=1, batch_size=16)
    history = train_sic(model, images, labels, config, anchors=anchors)
    assert history.epochs[0].phase == "anchored"


def test_collapsed_needs_loss_at_ln2_and_identical_embeddings() -> None:
    def history(loss: float, cosine: float) -> TrainHistory:
        record = EpochRecord(epoch=1, loss=loss, lr=1e-3, seconds=1.0)
        return TrainHistory(num_examples=10, epochs=[record], final_mean_cosine=cosine)

    assert history(math.log(2) + 5e-4, 0.995).collapsed
    assert not history(math.log(2) + 5e-3, 0.995).collapsed
    assert not history(math.log(2), 0.9).collapsed
    assert not TrainHistory(num_examples=0).collapsed


@pytest.mark.parametrize("field", ["switch_auroc", "anchor_weight"])
def test_bad_recipe_settings_name_the_field(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: -1.0})


def test_the_anchored_term_is_added_to_episodic_steps(disc_images) -> None:
    """With the same draws, anchor_weight changes the episodic loss (the term is there)."""
    images, labels, _ = disc_images(32, 32, seed=0)
    losses = []
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = create_model("bcos_cnn_small", in_channels=1, num_classes=2, width=8)
        config = TrainConfig(epochs=1, batch_size=16, switch_auroc=0.0, anchor_weight=weight)
        losses.append(train_sic(model, images, labels, config).final_loss)
    assert losses[1] > losses[0] + 0.1
