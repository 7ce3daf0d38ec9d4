"""Model construction, training validation, checkpoints and federated filter renormalisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sic_core import (
    ConfigError,
    TrainConfig,
    create_encoder,
    create_model,
    list_encoders,
    load_checkpoint,
    save_checkpoint,
    train_sic,
    unit_filter_state_dict,
)
from sic_core.training import learning_rate_factor, sample_support_indices


def test_registry_lists_the_cpu_encoder_first_and_rejects_unknown_names() -> None:
    assert list_encoders()[0] == "bcos_cnn_small"
    assert "bcos_resnet18" in list_encoders()
    with pytest.raises(ConfigError, match="bcos_cnn_small"):
        create_model("resnet50", 1, 2)


def test_encoder_loads_a_local_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_encoder("bcos_cnn_small", 2, width=8)
    path = tmp_path / "encoder.pt"
    torch.save(source.state_dict(), path)
    loaded = create_encoder("bcos_cnn_small", 2, width=8, weights=path)
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)
    with pytest.raises(ConfigError, match="does not exist"):
        create_encoder("bcos_cnn_small", 2, weights=tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        create_encoder("bcos_cnn_small", 2, width=16, weights=path)


def test_invalid_model_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("bcos_cnn_small", 1, 1)
    with pytest.raises(ConfigError, match="temperature"):
        create_model("bcos_cnn_small", 1, 2, temperature=0)


def test_set_support_validates_shapes_and_labels() -> None:
    model = create_model("bcos_cnn_small", 1, 2, proj_dim=8)
    with pytest.raises(ValueError, match="support vectors"):
        model.set_support(torch.rand(6, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="support labels"):
        model.set_support(torch.rand(6, 8), torch.full((6,), 2))
    with pytest.raises(ValueError, match="NaN"):
        model.set_support(torch.full((2, 8), float("nan")), torch.tensor([0, 1]))


def test_training_rejects_images_outside_unit_interval() -> None:
    model = create_model("bcos_cnn_small", 1, 2, proj_dim=8, width=4)
    images = torch.rand(4, 1, 8, 8) * 2
    with pytest.raises(ValueError, match=r"images.*\[0, 1\]"):
        train_sic(model, images, torch.tensor([0, 1, 0, 1]), TrainConfig(epochs=1))


def test_training_step_changes_weights_and_sets_real_supports() -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=2, proj_dim=8, width=4)
    images = torch.rand(12, 1, 16, 16)
    labels = torch.arange(12) % 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_sic(model, images, labels, TrainConfig(epochs=3, batch_size=4))
    assert len(history.epochs) == 3 and history.num_examples == 12
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    embeddings = model.embed(images).detach()
    for vector in model.support_vectors:
        assert (embeddings - vector).abs().sum(dim=1).min() < 1e-5


def test_reference_schedule_warms_up_then_halves() -> None:
    config = TrainConfig(epochs=50, lr=1e-3, decay_after=0.5)
    assert learning_rate_factor(0, total_epochs=50, config=config) == pytest.approx(0.1)
    assert learning_rate_factor(1, total_epochs=50, config=config) == pytest.approx(0.55)
    assert learning_rate_factor(10, total_epochs=50, config=config) == 1.0
    assert learning_rate_factor(25, total_epochs=50, config=config) == 1.0
    assert learning_rate_factor(30, total_epochs=50, config=config) == 0.5
    assert learning_rate_factor(40, total_epochs=50, config=config) == 0.125
    assert learning_rate_factor(45, total_epochs=50, config=config) == 0.0625


def test_default_schedule_stays_constant_after_warm_up() -> None:
    config = TrainConfig(epochs=12)
    assert learning_rate_factor(0, total_epochs=12, config=config) == pytest.approx(0.2)
    assert learning_rate_factor(1, total_epochs=12, config=config) == pytest.approx(0.6)
    assert [learning_rate_factor(e, total_epochs=12, config=config) for e in (2, 6, 11.9)] == [
        1.0,
        1.0,
        1.0,
    ]


def test_episode_supports_avoid_the_query_batch_when_possible() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    generator = torch.Generator().manual_seed(0)
    indices, support_labels = sample_support_indices(
        labels, 2, [0, 1, 2], generator, exclude=torch.tensor([0, 1, 4])
    )
    assert support_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert set(indices[:2].tolist()) == {2, 3}
    assert indices[4:].tolist() == [6, 6]


def test_checkpoint_round_trip_and_bad_files(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 3, n_shot=2, proj_dim=8, width=4)
    model.set_support(torch.rand(6, 8), torch.arange(3).repeat_interleave(2))
    path = save_checkpoint(
        tmp_path / "ckpt" / "model.pt",
        model,
        support_indices=torch.arange(6),
        metadata={"round": 3},
    )
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]
    loaded = load_checkpoint(path)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(loaded.model(x), model(x))
    assert loaded.metadata == {"round": 3}
    assert loaded.model.config == model.config
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"garbage\.pt"):
        load_checkpoint(garbage)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")


def test_unit_filter_state_dict_keeps_outputs_and_model() -> None:
    torch.manual_seed(0)
    model = create_model("bcos_resnet18", 1, 2, proj_dim=8, width=4)
    model.set_support(torch.rand(6, 8), torch.arange(2).repeat_interleave(3))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.mul_(torch.rand(parameter.shape[0], *[1] * (parameter.dim() - 1)) * 5)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 16, 16)
    before = model(x)
    state = unit_filter_state_dict(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name])  # the model itself is untouched
    filters = [name for name in state if name.endswith("linear.weight")]
    assert filters
    for name in filters:
        norms = state[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    model.load_state_dict(state)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
