"""The privacy ledger: Opacus-exact ε, atomic persistence, budget refusal, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.privacy.ledger import LEDGER_FILE, Mechanism, PrivacyLedger, epsilon_of
from sic_core.errors import ConfigError, PrivacyBudgetError

ROOT = Path(__file__).resolve().parents[2]


def _mechanism(round_: int, kind: str = "dp-sgd", steps: int = 20) -> Mechanism:
    return Mechanism(
        kind=kind, run_id="7", round=round_, noise_multiplier=1.1, sample_rate=0.05, steps=steps
    )


def test_epsilon_equals_a_fresh_opacus_accountant_over_the_history(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_state_dir(tmp_path, delta=1e-5, max_epsilon=100)
    mechanisms = [_mechanism(1), _mechanism(1, "support", 1), _mechanism(2)]
    ledger.record(mechanisms)
    fresh = RDPAccountant()
    for m in mechanisms:
        for _ in range(m.steps):
            fresh.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    expected = fresh.get_epsilon(delta=1e-5)
    reloaded = PrivacyLedger.in_state_dir(tmp_path, delta=1e-5, max_epsilon=100)
    assert reloaded.epsilon == pytest.approx(expected, rel=1e-9)
    assert reloaded.mechanisms[0].recorded_at


def test_epsilon_grows_with_every_mechanism_and_is_zero_without_any() -> None:
    assert epsilon_of([], 1e-5) == 0.0
    values = [epsilon_of([_mechanism(r) for r in range(1, n + 1)], 1e-5) for n in range(1, 5)]
    assert values == sorted(values) and len(set(values)) == 4


def test_budget_refusal_names_the_numbers_and_its_code(tmp_path: Path) -> None:
    ledger = PrivacyLedger.in_state_dir(tmp_path, delta=1e-5, max_epsilon=0.01)
    with pytest.raises(PrivacyBudgetError, match=r"max_epsilon 0\.01") as raised:
        ledger.check_budget([_mechanism(1)])
    assert raised.value.reason == "privacy_budget_exhausted"
    assert not (tmp_path / LEDGER_FILE).exists()  # a refused round spends nothing


def test_unreadable_ledger_stops_rather_than_resetting(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        PrivacyLedger.in_state_dir(tmp_path, delta=1e-5, max_epsilon=8)


def test_invalid_mechanisms_are_rejected() -> None:
    with pytest.raises(ConfigError, match="noise_multiplier"):
        Mechanism(kind="dp-sgd", run_id="1", round=1, noise_multiplier=0, sample_rate=0.1, steps=1)
    with pytest.raises(ConfigError, match="sample_rate"):
        Mechanism(kind="dp-sgd", run_id="1", round=1, noise_multiplier=1, sample_rate=1.5, steps=1)


def test_a_failed_write_leaves_the_previous_ledger_intact(tmp_path: Path, monkeypatch) -> None:
    ledger = PrivacyLedger.in_state_dir(tmp_path, delta=1e-5, max_epsilon=100)
    ledger.record([_mechanism(1)])
    before = (tmp_path / LEDGER_FILE).read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", explode)
    with pytest.raises(OSError, match="disk full"):
        ledger.record([_mechanism(2)])
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    assert len(ledger.mechanisms) == 1
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]


RECORDER = """
import sys
from client.privacy.ledger import Mechanism, PrivacyLedger
ledger = PrivacyLedger.in_state_dir(sys.argv[1], delta=1e-5, max_epsilon=1e9)
round_ = len(ledger.mechanisms)
while True:
    round_ += 1
    ledger.record([Mechanism(kind="dp-sgd", run_id="9", round=round_, noise_multiplier=1.0,
                             sample_rate=0.01, steps=5)])
    print(round_, flush=True)
"""


def _kill_after_some_records(state_dir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", RECORDER, str(state_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert process.stdout is not None
        for _ in range(5):
            process.stdout.readline()
        time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)


def test_killing_a_site_mid_write_keeps_the_ledger_whole_and_epsilon_monotone(
    tmp_path: Path,
) -> None:
    epsilons = []
    for _ in range(2):
        _kill_after_some_records(tmp_path)
        ledger = PrivacyLedger.in_state_dir(tmp_path, delta=1e-5, max_epsilon=1e9)
        rounds = [m.round for m in ledger.mechanisms]
        assert rounds == list(range(1, len(rounds) + 1))  # nothing lost, nothing duplicated
        epsilons.append(ledger.epsilon)
        payload = json.loads((tmp_path / LEDGER_FILE).read_text())
        assert len(payload["mechanisms"]) == len(rounds)
    assert epsilons[1] > epsilons[0] > 0
