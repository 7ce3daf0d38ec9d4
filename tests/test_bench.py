"""Smoke tests of the benchmark sections (tiny sizes): `make bench` must not rot."""

from __future__ import annotations

import math

import torch

from bench.cli_bench import run as run_cli
from bench.dp_bench import run as run_dp
from bench.explain_bench import explanations_per_s
from bench.training_bench import run as run_training


def test_training_bench_reports_positive_ratios() -> None:
    figures = run_training(torch.device("cpu"), size=32, batch=4, repeats=1)
    for key in (
        "sic_vs_same_encoder_train_ratio",
        "sic_vs_blackbox_train_ratio",
        "sic_vs_bcos_resnet_train_ratio",
    ):
        assert math.isfinite(figures[key]) and figures[key] > 0


def test_dp_bench_reports_the_overhead_of_the_faster_mode() -> None:
    figures = run_dp(torch.device("cpu"), size=16, batch=4, repeats=1)
    assert figures["dp_overhead_ratio"] == min(
        figures["dp_overhead_ratio_hooks"], figures["dp_overhead_ratio_functorch"]
    )
    assert figures["dp_overhead_ratio"] > 0


def test_explanations_per_second_is_measured() -> None:
    assert explanations_per_s(torch.device("cpu"), size=16, batch=2) > 0


def test_one_site_message_is_timed_step_by_step(tmp_path) -> None:
    import yaml

    from bench.site_message import message
    from tests.server.fedkit import write_site

    site = write_site(tmp_path, "site_bench", size=16)
    config = yaml.safe_load(site.read_text())
    config["compute"] = {"device": "cpu"}
    site.write_text(yaml.safe_dump(config))
    figures = message(site, epochs=1, since=None)
    parts = ("imports_s", "config_s", "device_init_s", "cache_s", "model_s")
    assert figures["overhead_s"] == sum(figures[part] for part in parts)
    assert all(figures[part] >= 0 for part in parts)
    assert figures["device"] == "cpu" and figures["train_images"] == 24
    for work in ("train_s", "support_s", "evaluate_s", "audit_s"):
        assert figures[work] > 0
    assert (site.parent / "state" / "reports" / "round_002" / "report.json").is_file()


def test_cli_bench_times_both_helps(tmp_path) -> None:
    figures = run_cli(tmp_path, repeats=1)
    assert figures.keys() == {"server_help_s", "client_help_s"}
    assert all(math.isfinite(value) and value > 0 for value in figures.values())
