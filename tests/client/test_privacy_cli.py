"""``python -m client privacy`` through typer's runner."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from client.cli import app
from client.privacy.ledger import Mechanism, PrivacyLedger


def _site(tmp_path: Path, max_epsilon: float) -> Path:
    config = tmp_path / "site.yaml"
    config.write_text(
        "name: site_x\nstate_dir: state\n"
        "data:\n  format: medmnist\n  npz: data.npz\n  class_names: [normal, nodule]\n"
        f"privacy:\n  enabled: true\n  max_epsilon: {max_epsilon}\n"
    )
    return config


def _spend(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_state_dir(tmp_path / "state", delta=1e-5, max_epsilon=1e9)
    ledger.record(
        [
            Mechanism(
                kind="dp-sgd", run_id="3", round=1, noise_multiplier=1.0, sample_rate=0.1, steps=30
            )
        ]
    )


def test_privacy_lists_the_ledger_and_the_budget_left(tmp_path: Path) -> None:
    _spend(tmp_path)
    result = CliRunner().invoke(app, ["privacy", "--site", str(_site(tmp_path, 50.0))])
    assert result.exit_code == 0, result.output
    assert "dp-sgd" in result.output and "epsilon spent" in result.output
    assert "privacy.enabled: true" in result.output


def test_privacy_exits_1_when_the_budget_is_spent(tmp_path: Path) -> None:
    _spend(tmp_path)
    result = CliRunner().invoke(app, ["privacy", "--site", str(_site(tmp_path, 0.5))])
    assert result.exit_code == 1
    assert "budget exhausted" in result.output


def test_privacy_exits_2_on_an_unreadable_ledger(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "privacy_ledger.json").write_text("[")
    result = CliRunner().invoke(app, ["privacy", "--site", str(_site(tmp_path, 5.0))])
    assert result.exit_code == 2
    assert "unreadable" in result.output
