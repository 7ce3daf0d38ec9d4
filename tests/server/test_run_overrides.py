"""`server run --set`: a bad key or value is named, with the valid keys, before submission."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.coordinator import Coordinator, CoordinatorAddresses
from server.settings import RunSettings

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A coordinator home that `start` would have written (nothing listens there)."""
    Coordinator(tmp_path).save_addresses(
        CoordinatorAddresses(superlink="127.0.0.1:9", tracking_uri="http://127.0.0.1:9")
    )
    return tmp_path


def test_a_misspelt_key_is_named_with_a_suggestion_and_the_valid_keys(home: Path) -> None:
    result = runner.invoke(app, ["run", "--home", str(home), "--set", "roundz=2"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "roundz: unknown run-config key; did you mean 'rounds'?" in text
    assert "valid keys: " + ", ".join(RunSettings.run_config_keys()) in text
    assert "submitted" not in text


def test_an_ill_typed_value_is_named(home: Path) -> None:
    result = runner.invoke(app, ["run", "--home", str(home), "--set", "rounds=two"])
    assert result.exit_code == 1
    assert "rounds: Input should be a valid integer" in " ".join(result.output.split())


def test_an_unknown_strategy_is_refused_with_a_suggestion(home: Path) -> None:
    result = runner.invoke(app, ["run", "--home", str(home), "--set", "strategy=fedavgg"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "strategy: unknown strategy 'fedavgg'; did you mean 'fedavg'?" in text
    assert "submitted" not in text


def test_a_field_name_in_place_of_its_key_is_refused_with_the_key(home: Path) -> None:
    result = runner.invoke(app, ["run", "--home", str(home), "--set", "local_epochs=3"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "local_epochs: unknown run-config key; did you mean 'local-epochs'?" in text
    assert "submitted" not in text


def test_a_known_strategy_in_capitals_passes_the_check() -> None:
    assert RunSettings.from_run_config({"strategy": "FedProx"}).strategy == "FedProx"


def test_setting_run_dir_is_deprecated_in_favour_of_home(home: Path) -> None:
    result = runner.invoke(
        app, ["run", "--home", str(home), "--set", "run-dir='/elsewhere'", "--set", "roundz=1"]
    )
    assert result.exit_code == 1  # refused for roundz, after the warning
    assert "warning: --set run-dir=... is deprecated, use --home" in result.stderr
