"""A phase with fewer than ``min-sites`` accepted sites aggregates nothing and ends the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from server.app import main
from server.audit import verify_audit_log
from server.checkpoint import RunFiles, read_rounds, read_status
from server.strategy import SicStrategy, TooFewSitesError
from sic_core.wire import format_error
from tests.server.fedkit import FakeGrid, server_identity, write_site
from tests.server.test_federation import run_config_defaults
from tests.server.test_strategy import NODES, honest_app, make_strategy, train_round

RUN_ID = 9


def refusing_app(refusing: set[int]):
    """Sites in ``refusing`` refuse the app bundle, as the approval gate does."""

    def app(message: Message, context: Context) -> Message:
        if context.node_id in refusing:
            text = format_error("app_not_approved", NODES.get(context.node_id))
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, text), reply_to=message)
        return honest_app(message, context)

    return app


def strict_strategy(min_accepted: int) -> SicStrategy:
    strategy = make_strategy()
    strategy.min_accepted = min_accepted
    return strategy


def test_no_accepted_site_is_no_sites_and_names_every_reason() -> None:
    strategy = strict_strategy(2)
    grid = FakeGrid(refusing_app(set(NODES)), {n: {} for n in NODES})
    with pytest.raises(TooFewSitesError) as raised:
        train_round(strategy, grid)
    assert raised.value.reason == "no_sites"
    assert raised.value.details() == {
        "round": 1,
        "phase": "train",
        "required": 2,
        "accepted": [],
        "sites": {name: "app_not_approved" for name in NODES.values()},
    }
    assert "0 of the required 2 sites took part (site_a: app_not_approved" in str(raised.value)


def test_fewer_than_min_sites_is_too_few_sites() -> None:
    strategy = strict_strategy(2)
    grid = FakeGrid(refusing_app({22, 33}), {n: {} for n in NODES})
    with pytest.raises(TooFewSitesError) as raised:
        train_round(strategy, grid)
    assert raised.value.reason == "too_few_sites"
    assert raised.value.details()["accepted"] == ["site_a"]


def test_enough_sites_aggregate_as_before() -> None:
    strategy = strict_strategy(2)
    arrays, _ = train_round(strategy, FakeGrid(refusing_app({33}), {n: {} for n in NODES}))
    assert arrays is not None


def test_a_run_that_no_site_took_part_in_is_failed_with_no_checkpoint(tmp_path: Path) -> None:
    """The ServerApp records it in status.json and the audit log, and raises (Flower: failed)."""
    nodes = {100 + i: {"site-config": str(write_site(tmp_path, f"site_{i}"))} for i in range(2)}
    config = {
        **run_config_defaults(),
        "rounds": 2,
        "image-size": 16,
        "min-sites": 2,
        "node-wait": 5.0,
        "run-dir": str(tmp_path / "out"),
    }

    def refuse(message: Message, context: Context) -> Message:
        text = format_error("app_not_approved", f"site_{context.node_id - 100}")
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, text), reply_to=message)

    with server_identity(RUN_ID), pytest.raises(TooFewSitesError):
        main(FakeGrid(refuse, nodes, run_id=RUN_ID), Context(RUN_ID, 0, {}, RecordDict(), config))
    files = RunFiles(tmp_path / "out", RUN_ID)
    status = read_status(files.status_path)
    assert (status["status"], status["reason"], status["rounds"]) == ("failed", "no_sites", 2)
    assert status["sites"] == {"site_0": "app_not_approved", "site_1": "app_not_approved"}
    assert status["detail"].startswith("round 1, train: 0 of the required 2 sites took part")
    assert not files.checkpoint_dir.exists() or not list(files.checkpoint_dir.iterdir())
    assert read_rounds(files.rounds_path) == []
    entries = [json.loads(line) for line in files.audit_path.read_text().splitlines()]
    assert [entry["event"] for entry in entries] == ["run_started", "run_failed"]
    assert entries[-1]["details"]["reason"] == "no_sites"
    assert entries[-1]["details"]["sites"] == status["sites"]
    assert verify_audit_log(files.audit_path).ok
