"""The explainers benchmark's summary and merge (its runs are measured by `python -m bench`)."""

from __future__ import annotations

from typer.testing import CliRunner

from bench.__main__ import app
from bench.explainers_bench import combine, summarise


def _run(method: str, seed: int, **metrics: float) -> dict:
    return {"method": method, "preset": "easy", "size": 64, "seed": seed, "metrics": metrics}


RUNS = [
    _run("sic", 0, rma_lift=9.0, deletion_auc=0.2, seconds_per_image=0.01),
    _run("sic", 1, rma_lift=11.0, deletion_auc=0.4, seconds_per_image=0.01),
    _run("gradcam", 0, rma_lift=4.0, deletion_auc=0.1, seconds_per_image=0.002),
    _run("lime", 0, rma_lift=float("nan"), deletion_auc=0.5, seconds_per_image=1.0),
]


def test_the_summary_averages_seeds_and_names_the_winner_by_direction() -> None:
    summary = summarise(RUNS)
    sic = summary["by_method"]["easy"]["sic"]
    assert sic["rma_lift"] == {"mean": 10.0, "std": 1.4142135623730951, "seeds": 2}
    assert "rma_lift" not in summary["by_method"]["easy"]["lime"]  # NaN only: left out
    winners = summary["winners"]["easy"]
    assert winners["rma_lift"]["best"] == "sic"  # higher is better
    assert winners["rma_lift"]["margin"] == 6.0
    assert winners["deletion_auc"]["best"] == "gradcam"  # lower is better
    assert winners["deletion_auc"]["runner_up"] == "sic"
    assert winners["seconds_per_image"]["best"] == "gradcam"


def test_combine_replaces_runs_of_the_same_method_preset_and_seed() -> None:
    first = {"runs": RUNS[:1], "summary": {"quantus_speed": {"gini_speedup": 3.0}}}
    fresh = {"runs": [_run("sic", 0, rma_lift=1.0), RUNS[1]], "summary": {"quantus_speed": {}}}
    merged = combine(first, fresh)
    assert [(r["method"], r["seed"], r["metrics"]["rma_lift"]) for r in merged["runs"]] == [
        ("sic", 0, 1.0),
        ("sic", 1, 11.0),
    ]
    assert merged["summary"]["quantus_speed"] == {"gini_speedup": 3.0}


def test_the_cli_rejects_an_unknown_preset() -> None:
    result = CliRunner().invoke(app, ["--only", "explainers", "--presets", "hard"])
    assert result.exit_code != 0
    assert "unknown ['hard']" in result.output
