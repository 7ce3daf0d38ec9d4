"""A DP federation in-process: a site whose budget is spent refuses, the run goes on."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict

from client.app import app as client_app
from client.privacy.ledger import LEDGER_FILE
from server.app import main
from server.checkpoint import RunFiles, read_rounds, read_status
from tests.server.fedkit import FakeGrid, server_identity, write_site

pytestmark = pytest.mark.slow

SIZE = 16
RUN_ID = 11


def _private_site(root: Path, name: str, seed: int, **privacy: float) -> Path:
    path = write_site(root, name, size=SIZE, seed=seed)
    config = yaml.safe_load(path.read_text())
    config["privacy"] = {"enabled": True, **privacy}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("dp_federation")
    sites = {
        "site_a": _private_site(root, "site_a", 0, epsilon_per_round=2.0),
        "site_b": _private_site(root, "site_b", 1, epsilon_per_round=2.0),
        "site_poor": _private_site(root, "site_poor", 2, max_epsilon=0.05),
    }
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    run_config = {
        **tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"],
        "rounds": 2,
        "image-size": SIZE,
        "local-epochs": 1,
        "batch-size": 8,
        "min-sites": 2,
        "dp": True,
        # One anchor round, so that round 2 asks for a private support release.
        "anchor-rounds": 1,
        "run-dir": str(root / "out"),
        "round-timeout": 120.0,
        "node-wait": 5.0,
    }
    nodes = {200 + i: {"site-config": str(path)} for i, path in enumerate(sites.values())}
    grid = FakeGrid(client_app, nodes, run_id=RUN_ID)
    with server_identity(RUN_ID):
        main(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
    return root, sites


def test_a_site_without_budget_refuses_and_the_run_completes_without_it(federation) -> None:
    root, sites = federation
    files = RunFiles(root / "out", RUN_ID)
    assert read_status(files.status_path)["status"] == "completed"
    rounds = read_rounds(files.rounds_path)
    assert [entry["round"] for entry in rounds] == [1, 2]
    for entry in rounds:
        # Round 1 is an anchor round: the global support set stays the public anchors and no
        # support release is asked for.
        phases = ("train",) if entry["round"] == 1 else ("train", "support")
        assert entry["sites"]["support"] == [] or entry["round"] > 1
        for phase in phases:
            outcomes = {o["site"]: (o["status"], o["reason"]) for o in entry["sites"][phase]}
            assert outcomes["site_poor"] == ("failed", "privacy_budget_exhausted")
            assert outcomes["site_a"][0] == outcomes["site_b"][0] == "ok"
        # The refusing site is still evaluated (evaluation spends no privacy).
        assert {o["site"] for o in entry["sites"]["evaluate"]} == set(sites)
        assert files.checkpoint_path(entry["round"]).exists()
    # Nothing was spent at the refusing site; the others spent their two rounds.
    assert not (sites["site_poor"].parent / "state" / LEDGER_FILE).exists()
    for name in ("site_a", "site_b"):
        ledger = json.loads((sites[name].parent / "state" / LEDGER_FILE).read_text())
        assert [(m["kind"], m["round"]) for m in ledger["mechanisms"]] == [
            ("dp-sgd", 1),
            ("dp-sgd", 2),
            ("support", 2),
        ]


def test_epsilon_grows_every_round_within_budget(federation) -> None:
    root, _ = federation
    rounds = read_rounds(RunFiles(root / "out", RUN_ID).rounds_path)
    for name in ("site_a", "site_b"):
        spent = [
            next(o for o in entry["sites"]["train"] if o["site"] == name)["metrics"]["dp.epsilon"]
            for entry in rounds
        ]
        assert 0 < spent[0] < spent[1] <= 8.0
