"""A whole federation in-process: the real ServerApp ``main`` and ClientApp on a fake Grid.

One module-scoped run on tiny SynthCXR data (32 px) with five sites: SynthCXR A, B, C, a
site without any "nodule" image, and a site whose config does not fit the model (it fails
every message). The tests read that run from different angles, including an audit of every
message the sites sent.
"""

from __future__ import annotations

import csv
import json
import random
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from client.app import STATE_PROGRESS
from client.app import app as client_app
from client.config import load_site_config
from client.data import load_site_data
from client.synth import generate_synthcxr
from server.app import initial_weights, main
from server.audit import arrays_sha256, file_sha256, json_sha256, verify_audit_log
from server.checkpoint import (
    ROUND_CHECKPOINT_FORMAT,
    RunFiles,
    capture_rng_state,
    load_checkpoint,
    read_rounds,
    read_status,
    restore_rng_state,
)
from server.registry import model_from_round_checkpoint
from server.settings import RunSettings
from sic_core import create_model, unit_filter_state_dict
from sic_core.calibration import MARGIN_EDGES, Calibration
from sic_core.wire import (
    SUPPORT_BUFFER_KEYS,
    ArrayKey,
    ConfigKey,
    EvalMetric,
    RecordKey,
    ReportKey,
    WhyMetric,
    parse_error,
)
from tests.server.fedkit import FAB_HASH, FakeGrid, server_identity

SIZE = 32
RUN_ID = 7
ROUNDS = 2
REAL_SITES = ("site_a", "site_b", "site_c")


def run_config_defaults() -> dict:
    """The run config `flwr run` would send: pyproject's defaults."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def derived_site(
    source: Path, target: Path, name: str, *, keep_label: int | None = None, image_size: int = SIZE
) -> Path:
    """A site reading ``source``'s DICOM files with another name, label subset or size."""
    target.mkdir(parents=True)
    config = yaml.safe_load((source / "site.yaml").read_text())
    # A derived site keeps its example images to itself: its reports leave redacted.
    config.update(
        {
            "name": name,
            "state_dir": str(target / "state"),
            "reporting": {"share_example_images": False},
        }
    )
    config["data"].update(
        {"labels_csv": str(target / "labels.csv"), "root": str(source), "image_size": image_size}
    )
    with open(source / "labels.csv") as stream:
        rows = list(csv.DictReader(stream))
    kept = [row for row in rows if keep_label is None or int(row["label"]) == keep_label]
    with open(target / "labels.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    (target / "site.yaml").write_text(yaml.safe_dump(config))
    return target / "site.yaml"


@dataclass
class Federation:
    root: Path
    grid: FakeGrid
    site_yamls: dict[str, Path]
    files: RunFiles


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("federation")
    synth = generate_synthcxr(root / "synth", preset="easy", size=SIZE, scale=0.1, seed=0)
    site_yamls = {name: synth / name / "site.yaml" for name in REAL_SITES}
    # SynthCXR writes private site configs; site_a opts in to sharing example images (as the
    # demo's synthetic sites do), so that both kinds of report are checked.
    shared = yaml.safe_load(site_yamls["site_a"].read_text())
    shared["reporting"] = {"share_example_images": True}
    site_yamls["site_a"].write_text(yaml.safe_dump(shared))
    site_yamls["site_nonodule"] = derived_site(
        synth / "site_a", root / "nonodule", "site_nonodule", keep_label=0
    )
    site_yamls["site_bad"] = derived_site(
        synth / "site_b", root / "bad", "site_bad", image_size=2 * SIZE
    )
    nodes = {100 + i: {"site-config": str(path)} for i, path in enumerate(site_yamls.values())}
    run_config = {
        **run_config_defaults(),
        "rounds": ROUNDS,
        "image-size": SIZE,
        "min-sites": 2,
        "local-epochs": 1,
        "batch-size": 16,
        "run-dir": str(root / "out"),
        "round-timeout": 60.0,
        "node-wait": 5.0,
    }
    grid = FakeGrid(client_app, nodes, run_id=RUN_ID)
    with server_identity(RUN_ID):
        main(grid, Context(RUN_ID, 0, {}, RecordDict(), run_config))
    return Federation(root, grid, site_yamls, RunFiles(root / "out", RUN_ID))


def test_run_completes_with_checkpoints_and_round_log(federation: Federation) -> None:
    assert read_status(federation.files.status_path)["status"] == "completed"
    rounds = read_rounds(federation.files.rounds_path)
    assert [entry["round"] for entry in rounds] == [1, 2]
    for server_round in (1, 2):
        state = load_checkpoint(federation.files.checkpoint_path(server_round))
        assert state["round"] == server_round
        model = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
        weights = set(model.state_dict()) - SUPPORT_BUFFER_KEYS
        assert set(state["arrays"]) == weights
        assert state["support_vectors"].shape == (6, 128)
        assert set(state["sites"].values()) >= {*REAL_SITES, "site_nonodule", "site_bad"}
        assert "python" in state["rng"]
    leftovers = [
        p.name for p in federation.files.checkpoint_dir.iterdir() if p.name.startswith(".")
    ]
    assert leftovers == []


def test_failing_site_is_attributed_by_name_and_the_others_carry_on(federation: Federation) -> None:
    for entry in read_rounds(federation.files.rounds_path):
        for phase, rows in entry["sites"].items():
            by_site = {row["site"]: row for row in rows}
            assert by_site["site_bad"]["status"] == "failed", phase
            assert by_site["site_bad"]["reason"] == "config_error"
            for name in (*REAL_SITES, "site_nonodule"):
                assert by_site[name]["status"] == "ok", (phase, name)
        assert entry["summary"]["fed/train_sites_ok"] == 4
        assert entry["summary"]["fed/train_sites_failed"] == 1


def test_site_without_a_class_trains_and_keeps_the_global_supports(federation: Federation) -> None:
    last = read_rounds(federation.files.rounds_path)[-1]
    evaluate = {row["site"]: row["metrics"] for row in last["sites"]["evaluate"]}
    support = {row["site"]: row["metrics"] for row in last["sites"]["support"]}
    assert support["site_nonodule"]["support.classes-present"] == 1
    assert support["site_a"]["support.classes-present"] == 2
    # Only the 3 "normal" supports can be replaced by a local image; AUROC is undefined.
    assert evaluate["site_nonodule"]["val.local-supports"] == 3
    assert evaluate["site_nonodule"]["val.auroc-defined"] == 0
    assert evaluate["site_a"]["val.local-supports"] == 6
    assert evaluate["site_a"]["val.auroc-defined"] == 1
    assert "perf/mean_site_auroc" in last["summary"]


def test_site_state_persists_across_rounds(federation: Federation) -> None:
    node = next(
        n for n, c in federation.grid.contexts.items() if "site_a" in c.node_config["site-config"]
    )
    progress = federation.grid.contexts[node].state[STATE_PROGRESS]
    assert progress["rounds-trained"] == ROUNDS
    assert progress["last-eval-round"] == ROUNDS
    reports = Path(load_site_config(federation.site_yamls["site_a"]).state_dir) / "reports"
    full = json.loads((reports / "round_002" / "report.json").read_text())
    assert full["provenance"]["site"] == "site_a"
    assert full["provenance"]["round"] == 2
    assert full["gallery"] and full["support_set"]  # the site's own copy has its images
    assert (reports / "round_002" / "report.html").read_text().startswith("<!DOCTYPE html>")
    history = json.loads((reports / "history.json").read_text())
    assert [entry["round"] for entry in history] == [1, 2]
    state = json.loads((reports / "explanation_state.json").read_text())
    assert len(state["support_ids"]) == 6


def test_server_keeps_each_sites_report_and_a_federation_summary(federation: Federation) -> None:
    reports = federation.files.reports_dir
    for server_round in (1, 2):
        for site in (*REAL_SITES, "site_nonodule"):
            folder = reports / f"round_{server_round:03d}" / site
            report = json.loads((folder / "report.json").read_text())
            assert report["provenance"]["site"] == site
            keys = {row["key"] for row in report["xai"]}
            assert "xai/completeness_max_rel_err" in keys
            # The server adds what only it knows: rank among sites, others' band, flags.
            assert all("rank" in row and "band" in row for row in report["xai"])
            assert set(report["flags"]) == {
                "flag/drift_outlier",
                "flag/completeness",
                "flag/artifact_mass_lift",
            }
            assert (
                "<h2>5. Explanation-quality dashboard</h2>" in (folder / "report.html").read_text()
            )
    summary = json.loads((reports / "federation_summary.json").read_text())
    assert summary["rounds"] == [1, 2]
    assert {row["site"] for row in summary["rows"]} == {*REAL_SITES, "site_nonodule"}
    assert (reports / "federation_summary.html").exists()


def _private_tokens(site_yamls: dict[str, Path]) -> set[str]:
    tokens: set[str] = set()
    for path in site_yamls.values():
        config = load_site_config(path)
        if config.data.image_size != SIZE:
            continue
        data = load_site_data(config)
        for split in ("train", "val", "test"):
            part = data.split(split)
            tokens.update(part.patient_ids)
            for file in part.files:
                tokens.update({file, Path(file).name, Path(file).stem})
    return {token for token in tokens if len(token) >= 4}


def test_no_pixels_file_names_or_patient_ids_leave_a_site(federation: Federation) -> None:
    tokens = _private_tokens(federation.site_yamls)
    assert len(tokens) > 50  # real file names and patient ids were collected
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
    weight_shapes = {
        key: tuple(value.shape)
        for key, value in model.state_dict().items()
        if key not in SUPPORT_BUFFER_KEYS
    }
    allowed = {
        "train": {str(RecordKey.ARRAYS), str(RecordKey.METRICS), str(RecordKey.SITE)},
        "query.support": {str(RecordKey.STATS), str(RecordKey.METRICS), str(RecordKey.SITE)},
        "query.calibration": {str(RecordKey.STATS), str(RecordKey.METRICS), str(RecordKey.SITE)},
        "evaluate": {str(RecordKey.METRICS), str(RecordKey.SITE), str(RecordKey.REPORT)},
    }
    seen_types = set()
    errors = 0
    for _, reply in federation.grid.sent_by_sites:
        kind = reply.metadata.message_type
        seen_types.add(kind)
        if reply.has_error():
            errors += 1
            assert parse_error(reply.error.reason) is not None, reply.error.reason
            assert not any(token in reply.error.reason for token in tokens)
            continue
        assert set(reply.content.keys()) == allowed[kind]
        for name, record in reply.content.items():
            if isinstance(record, ConfigRecord):
                for value in record.values():
                    assert isinstance(value, str) and not isinstance(value, bytes)
                    assert not any(token in value for token in tokens), (name, value[:200])
            elif isinstance(record, MetricRecord):
                assert all(isinstance(v, int | float) for v in record.values())
            else:
                assert isinstance(record, ArrayRecord)
                shapes = {key: tuple(array.numpy().shape) for key, array in record.items()}
                if name == str(RecordKey.ARRAYS):
                    assert shapes == weight_shapes
                elif kind == "query.calibration":
                    # Integer counts on fixed margin bins: nothing per case.
                    bins = MARGIN_EDGES.numel() - 1
                    assert shapes == {str(ArrayKey.MARGIN_COUNTS): (2, 2, bins)}
                    assert all(a.numpy().dtype == np.int64 for a in record.values())
                else:
                    assert shapes == {str(ArrayKey.SUMS): (2, 3, 128), str(ArrayKey.COUNTS): (2, 3)}
                for array in record.values():
                    assert array.numpy().shape[-2:] != (SIZE, SIZE)
    assert seen_types == set(allowed)
    assert errors == 4 * ROUNDS  # site_bad: every phase of every round
    sharing = {"site_a": True, "site_nonodule": False}
    for _, reply in federation.grid.sent_by_sites:
        if reply.has_error() or str(RecordKey.REPORT) not in reply.content:
            continue
        text = reply.content[str(RecordKey.REPORT)][str(ReportKey.JSON)]
        report = json.loads(text)
        site = report["provenance"]["site"]
        if site in sharing:
            assert ("data:image/png" in text) is sharing[site], site
            assert report["redacted"] is not sharing[site], site


def test_every_reply_is_finite(federation: Federation) -> None:
    for _, reply in federation.grid.sent_by_sites:
        if reply.has_error():
            continue
        for record in reply.content.array_records.values():
            assert all(np.isfinite(array.numpy()).all() for array in record.values())


def test_round_checkpoints_load_with_weights_only_and_restore_the_rngs(
    federation: Federation,
) -> None:
    path = federation.files.checkpoint_path(ROUNDS)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["format"] == ROUND_CHECKPOINT_FORMAT and state["round"] == ROUNDS
    draws = []
    for _ in range(2):
        restore_rng_state(state["rng"])
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    restore_rng_state(state["rng"])
    again = capture_rng_state()
    assert again["python"] == state["rng"]["python"]
    assert torch.equal(again["numpy"][1], state["rng"]["numpy"][1])


def test_a_round_checkpoint_is_accepted_as_initial_weights(federation: Federation) -> None:
    path = federation.files.checkpoint_path(ROUNDS)
    settings = RunSettings.from_run_config({"image-size": SIZE, "initial-weights": str(path)})
    arrays, _ = initial_weights(settings)
    expected = unit_filter_state_dict(model_from_round_checkpoint(load_checkpoint(path)))
    assert set(arrays.keys()) == set(expected) - SUPPORT_BUFFER_KEYS
    for key in arrays:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-6)


def test_the_audit_log_records_the_run_and_verifies(federation: Federation) -> None:
    path = federation.files.audit_path
    assert verify_audit_log(path).ok
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in entries] == [
        "run_started",
        *["round_completed"] * ROUNDS,
        "run_completed",
    ]
    started = entries[0]["details"]
    assert started["app_hash"] == FAB_HASH
    run_config = load_checkpoint(federation.files.checkpoint_path(1))["run_config"]
    settings = RunSettings.from_run_config(run_config)
    assert started["config_hash"] == json_sha256(settings.model_dump(by_alias=True))
    for server_round, entry in enumerate(entries[1:-1], start=1):
        details = entry["details"]
        assert details["round"] == server_round
        for phase in ("train", "support", "evaluate"):
            assert details["participants"][phase] == sorted([*REAL_SITES, "site_nonodule"])
        assert {(r["phase"], r["site"], r["reason"]) for r in details["rejected"]} == {
            (phase, "site_bad", "config_error") for phase in ("train", "support", "evaluate")
        }
        assert set(details["dp_epsilon"]) == {*REAL_SITES, "site_nonodule"}
        checkpoint = federation.files.checkpoint_path(server_round)
        assert details["checkpoint_sha256"] == file_sha256(checkpoint)
        assert details["model_hash"] == arrays_sha256(
            ArrayRecord(load_checkpoint(checkpoint)["arrays"])
        )


def test_one_global_calibration_is_fitted_sent_with_evaluate_and_checkpointed(
    federation: Federation,
) -> None:
    sent = [
        json.loads(message.content[str(RecordKey.CONFIG)][str(ConfigKey.CALIBRATION)])
        for _, message in federation.grid.delivered
        if message.metadata.message_type == "evaluate"
    ]
    assert sent, "no evaluate message carried a calibration"
    last_round = [Calibration.from_dict(entry) for entry in sent[-2:]]
    assert last_round[0] == last_round[1]  # one calibration for every site
    state = torch.load(
        federation.files.checkpoint_path(ROUNDS), map_location="cpu", weights_only=True
    )
    assert Calibration.from_dict(state["calibration"]) == last_round[-1]
    for _, reply in federation.grid.sent_by_sites:
        if reply.has_error() or reply.metadata.message_type != "evaluate":
            continue
        metrics = reply.content[str(RecordKey.METRICS)]
        assert 0 <= metrics[str(EvalMetric.ECE)] <= 1 and 0 <= metrics[str(EvalMetric.ECE_RAW)] <= 1
        assert all(str(key) in metrics for key in WhyMetric)
