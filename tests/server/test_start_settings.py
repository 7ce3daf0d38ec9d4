"""``server start`` remembers its host, ports and security options (``HOME/start.json``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.commands.start import _settings_for_this_start
from server.coordinator import Coordinator, StartSettings
from sic_core.errors import ConfigError

runner = CliRunner()
NONE_GIVEN = dict.fromkeys(("host", "port", "control_port", "mlflow_port", "insecure", "site_auth"))


def test_the_first_start_takes_the_defaults_and_the_flags(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path)
    settings = _settings_for_this_start(
        coordinator, {**NONE_GIVEN, "port": 8100, "insecure": True}, reconfigure=False
    )
    assert settings == StartSettings(port=8100, insecure=True)
    assert (settings.host, settings.control_port, settings.mlflow_port) == (
        "127.0.0.1",
        8001,
        5000,
    )


def test_a_restart_without_flags_reuses_what_the_first_start_stored(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path)
    stored = StartSettings(host="0.0.0.0", port=8100, control_port=8101, mlflow_port=5100)
    coordinator.save_start_settings(stored)
    assert _settings_for_this_start(coordinator, NONE_GIVEN, reconfigure=False) == stored
    same = {**NONE_GIVEN, "host": "0.0.0.0", "port": 8100}  # repeating a stored value is fine
    assert _settings_for_this_start(coordinator, same, reconfigure=False) == stored


def test_a_differing_flag_needs_reconfigure(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path)
    coordinator.save_start_settings(StartSettings(port=8100))
    changed = {**NONE_GIVEN, "port": 9000, "site_auth": False}
    with pytest.raises(ConfigError) as raised:
        _settings_for_this_start(coordinator, changed, reconfigure=False)
    message = str(raised.value)
    assert "--port 9000 differs from the stored --port 8100" in message
    assert "--no-site-auth differs from the stored --site-auth" in message
    assert "--reconfigure" in message
    assert _settings_for_this_start(coordinator, changed, reconfigure=True) == StartSettings(
        port=9000, site_auth=False
    )


def test_start_refuses_a_differing_flag_before_starting_anything(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path)
    coordinator.save_start_settings(StartSettings(port=8100, insecure=True))
    result = runner.invoke(app, ["start", "--home", str(tmp_path), "--port", "9000"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "--port 9000 differs from the stored --port 8100" in output
    assert not coordinator.pid_file.exists()


def test_a_bad_start_file_is_named_with_its_field(tmp_path: Path) -> None:
    coordinator = Coordinator(tmp_path)
    coordinator.start_file.write_text('{"port": "eighty"}')
    with pytest.raises(ConfigError, match=r"start\.json: port: "):
        coordinator.start_settings()
