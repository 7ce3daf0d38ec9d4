"""The milestone sanity suite on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from sic_core import SICModel, TrainConfig, create_model, embed_all, select_support, train_sic
from sic_core.metrics import (
    cascading_randomisation,
    data_randomisation,
    grid_pointing_game,
    grid_tile_scores,
    randomisation_layers,
)
from tests.sic_core.conftest import make_disc_images

SIZE = 48


@pytest.fixture(scope="module")
def trained() -> tuple[SICModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small model that finds bright discs, with supports that are real training images.

    Returns the model, the training images and labels, and the support images.
    """
    torch.manual_seed(0)
    images, labels, _ = make_disc_images(240, SIZE, seed=0)
    model = create_model("bcos_cnn_small", 1, 2, width=8)
    config = TrainConfig(epochs=5, warmup_epochs=0.5)
    train_sic(model, images, labels, config, finalize_support=False)
    support = select_support(embed_all(model, images), labels, 2, model.n_shot)
    model.set_support(support.vectors, support.labels)
    model.train()  # the checks must leave a training model in training mode
    return model, images, labels, images[support.indices]


def _held_out(n: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, masks = make_disc_images(n, SIZE, seed=1)
    return images, labels, masks[:, 0]


def _snapshot(model: SICModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: SICModel, before: dict[str, torch.Tensor]) -> bool:
    same = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return same and model.training and not model.explaining


def test_layers_run_from_input_to_output_and_pair_each_convolution_with_its_norm() -> None:
    model = create_model("bcos_cnn_small", 1, 2, width=4, proj_dim=8)
    layers = randomisation_layers(model)
    assert [name for name, _ in layers] == [
        *(f"encoder.layers.{i}" for i in range(5)),
        "projection",
    ]
    # index 0 of each block is its (parameter-free) padding
    assert layers[0][1] == ["encoder.layers.0.1.linear", "encoder.layers.0.2"]
    resnet = create_model("bcos_resnet18", 1, 2, width=4, proj_dim=8)
    names = [name for name, _ in randomisation_layers(resnet)]
    assert names[0] == "encoder.stem.0" and names[-1] == "projection"
    assert "encoder.stages.0.conv1" in names and "encoder.stages.2.shortcut" in names
    owned = {m for _, members in randomisation_layers(resnet) for m in members}
    with_parameters = {
        n for n, m in resnet.embedder.named_modules() if list(m.parameters(recurse=False))
    }
    assert owned == with_parameters


def test_cascading_randomisation_starts_at_one_and_decorrelates_to_the_bottom(trained) -> None:
    model, _, _, support_images = trained
    images, _, _ = _held_out(32)
    before = _snapshot(model)
    steps = cascading_randomisation(model, images, support_images, seed=0)
    assert _unchanged(model, before)
    names = [name for name, _ in steps]
    assert names == ["none", "projection", *(f"encoder.layers.{i}" for i in range(4, -1, -1))]
    # The control re-embeds the same support images under the same weights: identical maps.
    assert steps[0][1] == pytest.approx(1.0, abs=1e-4)
    correlations = [value for _, value in steps]
    assert correlations[-1] < 0.6
    assert correlations[-1] < correlations[0] - 0.4
    assert min(correlations[3:]) < correlations[1]
    again = cascading_randomisation(model, images, support_images, seed=0)
    assert [name for name, _ in again] == names
    assert [value for _, value in again] == pytest.approx(correlations, abs=1e-4)


def test_cascading_randomisation_needs_one_image_per_support(trained) -> None:
    model, _, _, support_images = trained
    with pytest.raises(ValueError, match="one per support vector"):
        cascading_randomisation(model, support_images[:2], support_images[:-1])


def test_grid_tile_scores_known_maps_and_random_maps_at_chance() -> None:
    generator = torch.Generator().manual_seed(0)
    positive = torch.randint(4, (200,), generator=generator)
    indicator = torch.zeros(200, 2, 2)
    indicator.view(200, 4)[torch.arange(200), positive] = 1.0
    maps = indicator.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    hits, shares = grid_tile_scores(maps - 0.5, positive, 2)  # negative mass never counts
    assert hits.all() and torch.allclose(shares, torch.ones(200))

    positive = torch.randint(9, (4000,), generator=generator)
    hits, shares = grid_tile_scores(torch.rand(4000, 18, 18, generator=generator), positive, 3)
    assert abs(hits.float().mean().item() - 1 / 9) < 0.02
    assert abs(shares.mean().item() - 1 / 9) < 0.01

    hits, shares = grid_tile_scores(-torch.ones(2, 4, 4), torch.tensor([0, 1]), 2)
    assert not hits.any() and shares.isnan().all()


def test_grid_pointing_game_finds_the_disc_tile(trained) -> None:
    model, _, _, _ = trained
    images, labels, _ = _held_out()
    before = _snapshot(model)
    result = grid_pointing_game(model, images, labels, grid=2, trials=64, seed=0)
    assert _unchanged(model, before)
    assert result.chance == 0.25 and result.trials == 64
    assert result.hit_rate >= 0.85
    assert result.positive_share > 0.4
    # An untrained model of the same architecture has no idea where the disc is.
    untrained = create_model("bcos_cnn_small", 1, 2, width=8)
    untrained.set_support(model.support_vectors.clone(), model.support_labels.clone())
    chance_like = grid_pointing_game(untrained, images, labels, trials=64, correct_only=False)
    assert chance_like.hit_rate < result.hit_rate - 0.3


def test_grid_pointing_game_validates_its_inputs(trained) -> None:
    model, _, _, _ = trained
    images, labels, _ = _held_out(8)
    with pytest.raises(ValueError, match="not divisible"):
        grid_pointing_game(model, images, labels, grid=5)
    with pytest.raises(ValueError, match="class 1 and of class 0"):
        grid_pointing_game(model, images[labels == 0], labels[labels == 0])
    with pytest.raises(ValueError, match="class 0 fills"):
        grid_pointing_game(model, images, labels, positive_class=0)


def test_data_randomisation_loses_localisation(trained) -> None:
    model, train_images, train_labels, _ = trained
    images, labels, masks = _held_out()
    before = _snapshot(model)
    result = data_randomisation(
        model, train_images, train_labels, images, labels, masks, epochs=3, seed=0
    )
    assert _unchanged(model, before)
    assert result.cases >= 25
    assert result.lift_trained > 3
    assert result.lift_shuffled < result.lift_trained / 2
    assert result.rank_correlation < 0.8
    # Shuffled labels carry no signal: the model fits them little better than a coin.
    assert result.shuffled_train_accuracy < 0.75

    nothing = data_randomisation(
        model, train_images, train_labels, images, labels, torch.zeros_like(masks), epochs=1
    )
    assert nothing.cases == 0 and math.isnan(nothing.lift_trained)
