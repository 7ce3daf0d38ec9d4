"""``python -m server report``: per-site reports and the summary rebuilt from MLflow alone."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.checkpoint import RunFiles
from server.cli import app
from server.federation import ExplanationRecord
from server.reports import SERVER_FLAGS_FINDING
from server.strategy import PhaseReport, SiteOutcome
from server.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker, runs_table_url
from sic_core.wire import EvalMetric, XaiMetric

SITES = ("site_a", "site_b", "site_c")


def outcome(site: str, server_round: int, lift: float) -> SiteOutcome:
    metrics = {
        str(EvalMetric.AUROC): 0.6 + 0.1 * server_round,
        str(EvalMetric.AUROC_DEFINED): 1.0,
        str(XaiMetric.COMPLETENESS): 1e-7,
        str(XaiMetric.ARTIFACT_MASS_LIFT): lift,
        str(XaiMetric.RMA_LIFT): math.nan,
    }
    report = {
        "provenance": {"site": site, "round": server_round},
        "xai": [
            {"key": str(XaiMetric.ARTIFACT_MASS_LIFT), "value": lift, "trend": [lift]},
            {"key": str(XaiMetric.RMA_LIFT), "value": None, "trend": [None]},
        ],
        "findings": [],
        "redacted": True,
    }
    return SiteOutcome(site=site, status="ok", metrics=metrics, report=report)


@pytest.fixture
def tracked_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[RunFiles, str]:
    monkeypatch.chdir(tmp_path)  # the sqlite store keeps artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    files = RunFiles(tmp_path / "out", 11)
    tracker = MlflowTracker(uri, "cli", run_name="fed-11", params={"rounds": "2"})
    tracker.start()
    record = ExplanationRecord(run="fed-11")
    for server_round in (1, 2):
        lifts = {"site_a": 1.0, "site_b": 1.5 * server_round + 2.0, "site_c": 1.1}
        phase = PhaseReport(
            "evaluate", server_round, tuple(outcome(s, server_round, lifts[s]) for s in SITES)
        )
        flags = record.add_round(server_round, phase)
        tracker.log_round(server_round, [phase], {"time/round_s": 1.0}, flags)
        record.write(server_round, files.reports_dir, tracker)
        files.write_checkpoint(
            server_round,
            {
                "mlflow": {"parent_run_id": tracker.parent_run_id},
                "run_config": {"tracking-uri": uri},
            },
        )
    files.write_status("completed", rounds=2)
    tracker.finish("completed")
    return files, uri


@pytest.mark.parametrize("old_spelling", [False, True], ids=["home-and-run-id", "run-dir"])
def test_reports_are_rebuilt_from_mlflow_alone(
    tracked_run: tuple[RunFiles, str], old_spelling: bool
) -> None:
    files, _ = tracked_run
    shutil.rmtree(files.reports_dir)
    argv = [str(files.run_dir)] if old_spelling else ["--home", str(files.run_dir), "11"]
    result = CliRunner().invoke(app, ["report", *argv])
    assert result.exit_code == 0, result.output
    deprecated = "warning: report RUN_DIR is deprecated, use report --home HOME RUN_ID"
    assert (deprecated in result.stderr) == old_spelling
    for server_round in (1, 2):
        for site in SITES:
            folder = files.reports_dir / f"round_{server_round:03d}" / site
            stored = json.loads((folder / "report.json").read_text())
            assert stored["provenance"] == {"site": site, "round": server_round}
            assert (folder / "report.html").exists()
    site_b = json.loads((files.reports_dir / "round_002" / "site_b" / "report.json").read_text())
    assert site_b["flags"]["flag/artifact_mass_lift"] == 1
    # MLflow holds the report with the server's flags line already in it: still one line.
    flag_lines = [f for f in site_b["findings"] if f.startswith(SERVER_FLAGS_FINDING)]
    assert flag_lines == [f"{SERVER_FLAGS_FINDING}artifact_mass_lift."]
    assert site_b["xai"][0]["rank"] == 1
    summary = json.loads((files.reports_dir / "federation_summary.json").read_text())
    assert summary["rounds"] == [1, 2]
    assert summary["flagged_sites_last_round"] == ["site_b"]
    lifts = {
        row["site"]: row[str(XaiMetric.ARTIFACT_MASS_LIFT)]
        for row in summary["rows"]
        if row["round"] == 2
    }
    assert lifts == {"site_a": 1.0, "site_b": 5.0, "site_c": 1.1}


def test_report_of_a_folder_without_runs_names_what_it_expected(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert "<run id>" in result.output
    result = CliRunner().invoke(app, ["report", "--home", str(tmp_path), "4242"])
    assert result.exit_code == 2
    assert "has no run" in result.output


def test_the_experiment_is_tagged_as_model_training(
    tracked_run: tuple[RunFiles, str], tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    _, uri = tracked_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sicfed/cli")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    # An experiment made before (or by hand, untagged) is tagged when a run starts in it.
    untagged = client.create_experiment("sicfed/older")
    MlflowTracker(uri, "older", run_name="fed-12", params={}).start()
    assert client.get_experiment(untagged).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_the_runs_table_link_opens_the_model_training_view() -> None:
    assert runs_table_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert runs_table_url("sqlite:///mlflow.db", "7") is None


def test_each_site_run_is_tagged_with_its_device(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from server.tracking import DEVICE_TAG

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "devices", run_name="fed-13", params={})
    tracker.start()
    devices = {1: ("cpu", "cuda:0 NVIDIA H100 80GB HBM3"), 2: ("cpu", "cuda:1 NVIDIA L4")}
    for server_round, (first, second) in devices.items():
        outcomes = (
            SiteOutcome(site="site_a", status="ok", metrics={}, device=first),
            SiteOutcome(site="site_b", status="ok", metrics={}, device=second),
            SiteOutcome(site="site_c", status="failed", reason="config_error"),
        )
        tracker.log_round(server_round, [PhaseReport("train", server_round, outcomes)], {})
    client = MlflowClient(uri)
    tags = {site: client.get_run(run).data.tags for site, run in tracker.site_run_ids.items()}
    assert tags["site_a"][DEVICE_TAG] == "cpu"
    assert tags["site_b"][DEVICE_TAG] == "cuda:1 NVIDIA L4"  # the latest device it named
    assert DEVICE_TAG not in tags["site_c"]  # a site that never replied names no device


def test_report_still_takes_run_id_as_an_option_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "runs" / "4242").mkdir(parents=True)
    for argv in (
        ["--home", str(tmp_path), "--run-id", "4242"],
        [str(tmp_path), "--run-id", "4242"],
    ):
        result = CliRunner().invoke(app, ["report", *argv])
        assert result.exit_code == 2  # the run was found; it has no checkpoint to read
        assert "no checkpoint of run 4242" in " ".join(result.output.split())
        assert "warning: --run-id is deprecated, use RUN_ID" in result.stderr
