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
