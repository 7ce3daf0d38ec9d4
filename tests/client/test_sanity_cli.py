"""``python -m client sanity`` on a small SynthCXR site, through typer's runner."""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

import client.commands.sanity as sanity_module
from client.cli import app
from client.config import SiteConfig
from client.data import load_site_data
from sic_core import (
    TrainConfig,
    create_model,
    embed_all,
    save_checkpoint,
    select_support,
    train_sic,
)

RUNNER = CliRunner()
WIDE = {"COLUMNS": "200"}
CHECKS = {
    "cascading_randomisation",
    "grid_pointing_game",
    "data_randomisation",
    "marker_counterfactual",
}


def _site_yaml(config: SiteConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _run(*args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, ["sanity", *args], env=WIDE)
    return result.exit_code, result.output


def test_help_has_examples_and_the_module_imports_nothing_heavy() -> None:
    code, output = _run("--help")
    assert code == 0 and "Examples" in output and "python -m client sanity" in output
    source = inspect.getsource(sanity_module)
    top_level = [line for line in source.splitlines() if line.startswith(("import", "from"))]
    assert not [line for line in top_level if "torch" in line or "sic_core" in line]


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("name: x\n")
    code, output = _run("--site", str(bad))
    assert code == 2 and "invalid config" in output


def test_sanity_suite_on_an_evaluated_site_model(
    synth_site: Callable[..., SiteConfig], tmp_path: Path
) -> None:
    config = synth_site("site_b")
    site = _site_yaml(config, tmp_path)
    model_file = Path(config.state_dir) / "model" / "latest.pt"

    code, output = _run("--site", str(site))
    assert code == 1
    assert str(model_file) in output.replace("\n", "")
    assert "at least one evaluated round" in " ".join(output.split())

    # What the evaluate step leaves behind: the global model with nearest-image local supports.
    data = load_site_data(config)
    train = data.split("train")
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, proj_dim=32, width=8)
    train_sic(
        model,
        train.images,
        train.labels,
        TrainConfig(epochs=3, warmup_epochs=0.5),
        finalize_support=False,
    )
    support = select_support(embed_all(model, train.images), train.labels, 2, model.n_shot)
    model.set_support(support.vectors, support.labels)
    save_checkpoint(
        model_file, model, support_indices=support.indices, metadata={"round": 3, "run_id": "r1"}
    )

    started = time.perf_counter()
    code, output = _run(
        "--site", str(site), "--epochs", "2", "--trials", "32", "--cascade-images", "12"
    )
    seconds = time.perf_counter() - started
    print(f"sanity command on site_b: {seconds:.1f} s")
    assert code in (0, 3), output
    assert "Sanity checks of site_b" in output and "grid_pointing_game" in output

    written = Path(config.state_dir) / "reports" / "sanity.json"
    text = written.read_text()
    results = json.loads(text)
    assert results["round"] == 3 and results["model_round"] == 3 and results["site"] == "site_b"
    assert set(results["passed"]) == CHECKS
    assert (code == 3) == (False in results["passed"].values())
    cascade = results["cascading_randomisation"]
    assert [name for name, _ in cascade] == [
        "none",
        "projection",
        *(f"encoder.layers.{i}" for i in range(4, -1, -1)),
    ]
    assert cascade[0][1] == pytest.approx(1.0, abs=1e-3)
    assert results["cascading_min_rank_corr"] == min(value for _, value in cascade[1:])
    assert results["grid_pointing_chance"] == 0.25
    assert 0 <= results["grid_pointing_hit_rate"] <= 1
    assert results["data_randomisation_epochs"] == 2
    # Site B carries the shortcut marker, so the counterfactual test applies.
    assert results["marker_counterfactual_pairs"] > 0
    assert results["marker_counterfactual_source"] == "site markers"
    assert math.isfinite(results["marker_counterfactual_shift"])
    assert results["computed_at"].endswith("+00:00")
    for value in (*train.files, *train.patient_ids, *data.split("val").files):
        assert value not in text
    assert not list(written.parent.glob(".*.tmp"))

    # Site A has no marker: the public marker is pasted, as the per-round audit does.
    other = synth_site("site_a")
    other_model = Path(other.state_dir) / "model" / "latest.pt"
    other_model.parent.mkdir(parents=True)
    other_model.write_bytes(model_file.read_bytes())
    other_site = _site_yaml(other, tmp_path / "a")
    code, output = _run(
        "--site", str(other_site), "--epochs", "1", "--trials", "8", "--cascade-images", "4"
    )
    assert code in (0, 3), output
    results = json.loads((Path(other.state_dir) / "reports" / "sanity.json").read_text())
    assert results["marker_counterfactual_source"] == "public marker pasted"
    assert results["marker_counterfactual_pairs"] > 0
