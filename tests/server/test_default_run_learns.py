"""A federation run with pyproject's run-config defaults learns from scratch.

SynthCXR easy at the default image size (64 px), sites A, B and C at full scale, the real
ServerApp ``main`` and ClientApp on the in-process fake Grid, nothing overridden but where
the run writes and how long it waits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from client.synth import default_sites, generate_synthcxr
from server.app import main
from server.checkpoint import RunFiles, read_rounds
from tests.server.fedkit import FakeGrid, server_identity
from tests.server.test_federation import run_config_defaults

RUN_ID = 11


@pytest.mark.slow
def test_a_run_with_the_default_run_config_learns(tmp_path: Path) -> None:
    defaults = run_config_defaults()
    synth = generate_synthcxr(
        tmp_path / "synth",
        preset="easy",
        size=int(defaults["image-size"]),
        seed=0,
        sites=default_sites()[:3],
    )
    nodes = {
        100 + i: {"site-config": str(synth / name / "site.yaml")}
        for i, name in enumerate(("site_a", "site_b", "site_c"))
    }
    run_config = {
        **defaults,
        "run-dir": str(tmp_path / "out"),
        "round-timeout": 600.0,
        "node-wait": 5.0,
    }
    with server_identity(RUN_ID):
        main(
            FakeGrid(client_app, nodes, run_id=RUN_ID),
            Context(RUN_ID, 0, {}, RecordDict(), run_config),
        )

    rounds = read_rounds(RunFiles(tmp_path / "out", RUN_ID).rounds_path)
    assert len(rounds) == defaults["rounds"]
    curve = []
    for entry in rounds:
        evaluated = entry["sites"]["evaluate"]
        assert [o["status"] for o in evaluated] == ["ok"] * 3, evaluated
        curve.append(sum(o["metrics"]["val.auroc"] for o in evaluated) / 3)
    print("mean site AUROC per round:", [round(value, 3) for value in curve])
    assert curve[-1] >= 0.9
    for entry in rounds:
        assert all(o["metrics"]["train.collapsed"] == 0 for o in entry["sites"]["train"])
