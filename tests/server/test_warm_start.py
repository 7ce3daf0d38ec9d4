"""The public warm start: ``python -m client pretrain`` and the run config's ``initial-weights``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.cli import app as client_cli
from client.warm_start import PUBLIC_WARM_START_EPOCHS, WarmStart
from server.app import initial_weights
from server.commands.demo import warm_start_stalled
from server.settings import RunSettings
from sic_core import create_model, unit_filter_state_dict
from sic_core.checkpoint import load_checkpoint, save_checkpoint
from sic_core.errors import ConfigError
from sic_core.training import EpochRecord, TrainHistory
from tests.server.fedkit import write_site

SIZE = 16


def test_pretrain_writes_a_checkpoint_the_server_starts_from(tmp_path: Path) -> None:
    public = write_site(tmp_path, "public_a", size=SIZE, seed=5)
    folder = tmp_path / "public"
    result = CliRunner().invoke(
        client_cli,
        ["pretrain", "--site", str(public), "--out", str(folder), "--epochs", "1", "--seed", "3"],
    )
    assert result.exit_code == 0, result.output
    out = folder / "init.pt"
    checkpoint = load_checkpoint(out)
    assert checkpoint.metadata["kind"] == "public-warm-start"
    assert checkpoint.metadata["public_sites"] == ["public_a"]
    assert checkpoint.metadata["epochs"] == 1
    # One epoch cannot leave the initial plateau: the coordinator is told to train longer.
    assert checkpoint.metadata["stalled"] is True
    assert "never left its initial plateau" in result.output
    assert warm_start_stalled(out)
    settings = RunSettings.from_run_config({"image-size": SIZE, "initial-weights": str(out)})
    arrays, _ = initial_weights(settings)
    expected = unit_filter_state_dict(checkpoint.model)
    for key in arrays:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-6)
    # Without it, the seeded random initialisation (which the warm start started from).
    random_arrays, _ = initial_weights(RunSettings.from_run_config({"image-size": SIZE}))
    assert any(not np.allclose(arrays[key].numpy(), random_arrays[key].numpy()) for key in arrays)


def test_initial_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "other.pt", create_model("bcos_cnn_small", 1, 2, n_shot=2))
    assert not warm_start_stalled(path)  # no pretrain metadata: nothing to warn about
    settings = RunSettings.from_run_config({"initial-weights": str(path)})
    with pytest.raises(ConfigError, match=r"initial-weights: .* n_shot 2 \(run: 3\)"):
        initial_weights(settings)
    missing = RunSettings.from_run_config({"initial-weights": str(tmp_path / "none.pt")})
    with pytest.raises(ConfigError, match=r"initial-weights: checkpoint: file .* does not exist"):
        initial_weights(missing)


@pytest.mark.parametrize(
    ("losses", "stalled"), [([0.71, 0.69, 0.69], True), ([0.71, 0.6], False), ([], True)]
)
def test_a_warm_start_that_never_left_its_plateau_is_flagged(
    losses: list[float], stalled: bool
) -> None:
    history = TrainHistory(num_examples=8)
    for epoch, loss in enumerate(losses, start=1):
        history.epochs.append(EpochRecord(epoch=epoch, loss=loss, lr=1e-3, seconds=1.0))
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=8, width=4)
    warm = WarmStart(model=model, history=history, sites=["p"], images=8, seconds=2.0)
    assert warm.stalled is stalled
    assert warm.metadata()["stalled"] is stalled


def test_pretrain_help_states_the_warm_starts_default_epochs() -> None:
    # The CLI cannot import the constant (torch) without slowing every --help.
    result = CliRunner().invoke(client_cli, ["pretrain", "--help"], env={"COLUMNS": "200"})
    assert f"(default: {PUBLIC_WARM_START_EPOCHS})" in result.output
