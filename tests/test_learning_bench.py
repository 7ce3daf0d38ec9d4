"""The learning benchmark's pieces: its models, exact maps, one tiny run and the summary."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from bench.learning_bench import (
    BcosLinearClassifier,
    Regime,
    RunRecord,
    _linear_head_maps,
    combine,
    summarise,
    train_one,
)
from client.data import SplitData
from tests.sic_core.conftest import make_disc_images


def _split(images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> SplitData:
    n = labels.shape[0]
    return SplitData(
        images=images,
        labels=labels,
        masks={"lesion": masks.to(torch.uint8)},
        has_mask={"lesion": torch.ones(n, dtype=torch.bool)},
        patient_ids=[f"p{i}" for i in range(n)],
        files=[f"f{i}" for i in range(n)],
    )


def test_linear_head_maps_are_complete() -> None:
    torch.manual_seed(0)
    model = BcosLinearClassifier()
    images = torch.rand(4, 1, 24, 24)
    _, maps = _linear_head_maps(model, images)
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), logits[:, 1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ["cnn", "bcos_linear", "sic"])
def test_one_tiny_run_records_every_figure(model: str) -> None:
    images, labels, masks = make_disc_images(24, 24, seed=0)
    regime = Regime(
        train=_split(images, labels, masks),
        val=_split(images, labels, masks),
        held_out=_split(images, labels, masks),
    )
    record = train_one(model, regime, epochs=2, seed=0)
    assert len(record.val_auroc) == 2
    assert record.best_auroc == pytest.approx(max(record.val_auroc), abs=1e-4)
    assert 0 <= record.held_out_auroc <= 1
    assert record.device == "cpu"
    if model == "cnn":
        assert record.lesion_lift is None  # a plain CNN has no exact maps


def _record(model: str, seed: int, epochs: int | None, best: float) -> RunRecord:
    return RunRecord(
        model=model,
        preset="easy",
        size=64,
        regime="site_a",
        seed=seed,
        val_auroc=[best],
        epochs_to_0p9=epochs,
        best_auroc=best,
        held_out_auroc=0.9,
        lesion_lift=None,
    )


def test_summary_ratios_count_a_run_that_never_reaches_0p9_as_budget_plus_one() -> None:
    records = [
        _record("cnn", 0, 2, 1.0),
        _record("cnn", 1, 2, 0.98),
        _record("sic", 0, 4, 0.97),
        _record("sic", 1, None, 0.89),  # easy's budget is 8: counts as 9
    ]
    result = summarise(records)
    assert result["sic_vs_cnn_epochs_to_0p9_ratio"]["easy"] == pytest.approx((4 + 9) / 2 / 2)
    assert result["sic_vs_cnn_auroc_ratio"]["easy"] == pytest.approx(0.93 / 0.99)
    sic = result["summary"]["easy"]["64"]["site_a"]["sic"]
    assert sic["reached_0p9"] == 1 and sic["seeds"] == 2
    assert sic["median_lesion_lift"] is None


def test_a_new_result_replaces_matching_runs_and_keeps_the_others() -> None:
    def result(*records: RunRecord) -> dict:
        return {"epochs": {"easy": 8}, "runs": [asdict(record) for record in records]}

    earlier = combine(None, result(_record("cnn", 0, 2, 1.0), _record("sic", 0, None, 0.5)))
    merged = combine(earlier, result(_record("sic", 0, 4, 0.97), _record("sic", 1, 6, 0.95)))
    assert [(run["model"], run["seed"], run["best_auroc"]) for run in merged["runs"]] == [
        ("cnn", 0, 1.0),
        ("sic", 0, 0.97),
        ("sic", 1, 0.95),
    ]
    assert merged["summary"]["easy"]["64"]["site_a"]["sic"]["seeds"] == 2
    assert merged["sic_vs_cnn_auroc_ratio"]["easy"] == pytest.approx(0.96 / 1.0)
    assert merged["epochs"] == {"easy": 8}


def test_runs_recorded_before_the_device_field_read_as_cpu_runs() -> None:
    legacy = asdict(_record("cnn", 0, 2, 1.0))
    del legacy["device"]
    merged = combine(None, {"epochs": {"easy": 8}, "runs": [legacy]})
    assert merged["runs"][0] == {**legacy, "device": "cpu"}
