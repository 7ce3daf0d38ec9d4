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

    # The explanations a learned model gives: evidence on the lesion at every site, and site
    # B's marker shortcut visible (SynthCXR's site B makes it the easier cue there). The
    # counterfactual shift, not the mass-lift flag, is asserted: the flag is crossed in the
    # demo's fifth round, and this run has four. Site B's lesion lift is held to a lower bar
    # because its marker competes with the lesion for the same evidence: after 4 rounds it
    # was 1.97 here and 3.84 in the demo (A and C: 8.3 / 7.6), so only "more than the
    # lesion's area share" (lift > 1) is stable there.
    last = {o["site"]: o["metrics"] for o in rounds[-1]["sites"]["evaluate"]}
    lesion_lifts = {site: metrics["xai/rma_lift"] for site, metrics in last.items()}
    shifts = {site: metrics["xai/marker_counterfactual_shift"] for site, metrics in last.items()}
    print("lesion lift:", lesion_lifts, "marker counterfactual shift:", shifts)
    assert lesion_lifts["site_a"] > 3 and lesion_lifts["site_c"] > 3, lesion_lifts
    assert lesion_lifts["site_b"] > 1, lesion_lifts
    others = [abs(shift) for site, shift in shifts.items() if site != "site_b"]
    assert shifts["site_b"] > max(0.03, 5 * max(others)), shifts
