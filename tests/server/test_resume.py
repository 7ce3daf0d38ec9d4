"""``server resume``: a run that lost its coordinator in round 2 continues after round 1 and
ends with the very weights of a run that never stopped (real ServerApp and ClientApp on the
in-process FakeGrid)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from typer.testing import CliRunner

from client.app import app as client_app
from server.app import build_strategy, main
from server.audit import verify_audit_log
from server.checkpoint import RunFiles, load_checkpoint, read_rounds, read_status
from server.cli import app as cli
from server.coordinator import Coordinator
from server.processes import ProcessGroup
from server.resume import find_resume_point, restore_strategy
from server.settings import RunSettings
from server.strategy import base_aggregator
from server.update_bound import UpdateNormBound
from sic_core.errors import ConfigError
from sic_core.wire import RecordKey
from tests.server.fedkit import FakeGrid, server_identity, write_site
from tests.server.test_federation import run_config_defaults

runner = CliRunner()
#: Flower run ids are unsigned 64-bit: this one does not fit a run-config integer.
RUN_ID = 15147595930455189831
RESUMED_RUN_ID = 8
ROUNDS = 2


class CoordinatorCrashError(ConnectionError):
    """Stands in for the SuperLink dying under the ServerApp."""


class CrashingGrid(FakeGrid):
    """A grid that dies when the first message of ``crash_round`` is pushed."""

    def __init__(self, *args, crash_round: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for message in messages:
            config = message.content.get(str(RecordKey.CONFIG))
            if isinstance(config, ConfigRecord) and config.get("server-round") == self.crash_round:
                raise CoordinatorCrashError("the SuperLink is gone")
        return super().push_messages(messages)


def _main(grid: FakeGrid, run_id: int, run_config: dict) -> None:
    with server_identity(run_id):
        main(grid, Context(run_id, 0, {}, RecordDict(), run_config))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunFiles, RunFiles]:
    """The same seeded run twice: once straight through, once crashed and resumed."""
    root = tmp_path_factory.mktemp("resume")
    nodes = {
        100 + i: {"site-config": str(write_site(root / "sites", f"site_{i}", size=32, seed=i))}
        for i in range(3)
    }
    config = {
        **run_config_defaults(),
        "rounds": ROUNDS,
        "update-clip-factor": 3.0,  # its norm history must survive the crash too
        "image-size": 32,
        "n-shot": 2,
        "local-epochs": 1,
        "batch-size": 8,
        "round-timeout": 60.0,
        "node-wait": 5.0,
    }
    straight = {**config, "run-dir": str(root / "straight")}
    _main(FakeGrid(client_app, nodes, run_id=RUN_ID), RUN_ID, straight)
    crashed = {**config, "run-dir": str(root / "crashed")}
    with pytest.raises(CoordinatorCrashError):
        _main(CrashingGrid(client_app, nodes, run_id=RUN_ID, crash_round=ROUNDS), RUN_ID, crashed)
    # `server resume` submits only these keys; a new Flower run with fresh site contexts.
    resumed = {
        **run_config_defaults(),
        "resume-run": str(RUN_ID),
        "run-dir": str(root / "crashed"),
    }
    _main(FakeGrid(client_app, nodes, run_id=RESUMED_RUN_ID), RESUMED_RUN_ID, resumed)
    return RunFiles(root / "straight", RUN_ID), RunFiles(root / "crashed", RUN_ID)


@pytest.mark.slow
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(
    runs: tuple[RunFiles, RunFiles],
) -> None:
    straight, resumed = (load_checkpoint(files.checkpoint_path(ROUNDS)) for files in runs)
    assert straight["arrays"].keys() == resumed["arrays"].keys()
    for key, value in straight["arrays"].items():
        assert torch.equal(value, resumed["arrays"][key]), key
    assert torch.equal(straight["support_vectors"], resumed["support_vectors"])
    for name, moments in straight["aggregator_state"].items():
        for key, value in moments.items():
            assert torch.equal(value, resumed["aggregator_state"][name][key]), (name, key)
    assert straight["update_norm_history"] == resumed["update_norm_history"]
    # The resumed round moved the weights (the comparison is not vacuous).
    before = load_checkpoint(runs[1].checkpoint_path(ROUNDS - 1))["arrays"]
    assert any(not torch.equal(before[k], v) for k, v in resumed["arrays"].items())


@pytest.mark.slow
def test_resumed_run_continues_the_original_files_and_audit_log(
    runs: tuple[RunFiles, RunFiles],
) -> None:
    files = runs[1]
    assert [entry["round"] for entry in read_rounds(files.rounds_path)] == [1, 2]
    status = read_status(files.status_path)
    assert status["status"] == "completed" and status["resumed_from_round"] == 1
    assert status["flower_run_id"] == str(RESUMED_RUN_ID)
    assert verify_audit_log(files.audit_path).ok
    entries = [json.loads(line) for line in files.audit_path.read_text().splitlines()]
    assert [entry["event"] for entry in entries] == [
        "run_started",
        "round_completed",
        "run_failed",
        "run_resumed",
        "round_completed",
        "run_completed",
    ]
    resumed = entries[3]["details"]
    assert resumed["from_round"] == 1 and resumed["flower_run_id"] == str(RESUMED_RUN_ID)


def test_resume_needs_a_complete_round(tmp_path: Path) -> None:
    files = RunFiles(tmp_path, 3)
    files.append_round({"round": 1})  # logged, but its checkpoint is missing
    with pytest.raises(ConfigError, match="no complete round to resume from"):
        find_resume_point(files)


def test_resume_run_holds_every_unsigned_64_bit_run_id() -> None:
    assert RunSettings.from_run_config({}).resume_run == ""  # a new run
    largest = str(2**64 - 1)
    assert RunSettings.from_run_config({"resume-run": largest}).resume_run == largest
    assert RunSettings.from_run_config({"resume-run": 4}).resume_run == "4"  # --set resume-run=4
    for bad in (-1, "-1", "12a", "../7"):
        with pytest.raises(ConfigError, match="resume-run"):
            RunSettings.from_run_config({"resume-run": bad})


def test_resume_sends_the_run_id_as_a_string_that_flower_accepts(tmp_path: Path) -> None:
    """Flower's run-config integers are signed 64-bit: the id travels as a TOML string."""
    from flwr.common.config import parse_config_args
    from flwr.common.serde import user_config_from_proto, user_config_to_proto

    from server.flower_cli import format_run_config

    with pytest.raises(ValueError, match="out of range"):  # why it cannot be an integer
        user_config_to_proto({"resume-run": RUN_ID})
    text = format_run_config({"resume-run": str(RUN_ID)})
    assert text == f'resume-run="{RUN_ID}"'
    parsed = parse_config_args([text])
    received = user_config_from_proto(user_config_to_proto(parsed))  # as the ServerApp gets it
    assert RunSettings.from_run_config(received).resume_run == str(RUN_ID)


def _superlink_running(home: Path, group: ProcessGroup) -> None:
    """A stand-in process recorded as the coordinator's SuperLink."""
    group.start(
        "superlink",
        [sys.executable, "-c", "import time; time.sleep(600)"],
        log_path=home / "logs" / "superlink.log",
        env=None,
    )
    group.write_pid_file(Coordinator(home).pid_file)


def test_resume_cli_needs_a_running_superlink(tmp_path: Path) -> None:
    result = runner.invoke(cli, ["resume", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "server start" in result.output


def test_resume_cli_names_what_it_cannot_resume(tmp_path: Path) -> None:
    for run_id, status in ((3, "completed"), (4, "killed")):
        RunFiles(tmp_path, run_id).write_status(status, rounds=2)
    with ProcessGroup() as group:
        _superlink_running(tmp_path, group)
        result = runner.invoke(cli, ["resume", "--home", str(tmp_path), "3"])
        assert result.exit_code == 1 and "run 3 ended completed: nothing to resume" in result.output
        result = runner.invoke(cli, ["resume", "--home", str(tmp_path)], env={"COLUMNS": "300"})
        assert result.exit_code == 1, result.output
        assert "resume-run 4: no complete round to resume from" in result.output


def test_restore_strategy_brings_back_the_server_state() -> None:
    """FedAdam's moments, the update-bound history, the support set and the site names."""
    settings = RunSettings.from_run_config({"strategy": "fedadam", "n-shot": 2, "proj-dim": 4})
    before = build_strategy(settings)
    adam = base_aggregator(before.aggregator)
    adam.m_t = {"w": np.full((2, 3), 0.5, np.float32)}
    adam.v_t = {"w": np.full((2, 3), 0.25, np.float32)}
    before.update_bound = UpdateNormBound(3.0, history=[[1.0, 2.0], [1.5]])
    before.sites.learn(101, "site_a")
    labels = torch.tensor([0, 0, 1, 1])
    state = {
        "aggregator": type(before.aggregator).__name__,
        "aggregator_state": before.aggregator_state(),
        "update_norm_history": before.update_bound.history,
        "support_vectors": torch.arange(16, dtype=torch.float32).reshape(4, 4),
        "support_labels": labels,
        "sites": before.sites.names,
    }
    after = build_strategy(settings)
    restore_strategy(after, state)
    restored = base_aggregator(after.aggregator)
    np.testing.assert_array_equal(restored.m_t["w"], adam.m_t["w"])
    np.testing.assert_array_equal(restored.v_t["w"], adam.v_t["w"])
    assert after.update_bound.history == [[1.0, 2.0], [1.5]]
    assert torch.equal(after.support.vectors, state["support_vectors"])
    assert after.sites.name_of(101) == "site_a"
    with pytest.raises(ConfigError, match="aggregator 'FedAvg' is not the run's 'FedAdam'"):
        restore_strategy(after, {**state, "aggregator": "FedAvg"})
