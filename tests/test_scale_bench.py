"""The scale benchmark's pure parts (no Ray): site derivation, node mapping and figures.

The simulation itself needs the optional ``[simulation]`` extra, which ``make test`` does not
install; ``python -m bench --only scale`` runs it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from bench.scale_bench import (
    MemoryTrace,
    backend_config,
    derive_sites,
    figures,
    run_config,
    simulation_client_app,
    site_for_partition,
    site_yamls,
)
from client.app import SITE_CONFIG_KEY
from client.config import load_site_config
from server.settings import RunSettings
from tests.server.fedkit import server_identity, wire_copy

MIB = 1024**2


def _base_site(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    config = {
        "name": name,
        "seed": 0,
        "state_dir": "state",
        "data": {
            "format": "dicom",
            "labels_csv": "labels.csv",
            "class_names": ["normal", "nodule"],
            "image_size": 32,
        },
        "reporting": {"share_example_images": True},
    }
    (folder / "site.yaml").write_text(yaml.safe_dump(config))
    return folder / "site.yaml"


def test_derived_sites_read_the_bases_round_robin_with_their_own_state(tmp_path: Path) -> None:
    bases = [_base_site(tmp_path / "synth", name) for name in ("site_a", "site_b")]
    written = derive_sites(bases, tmp_path / "sites", 5, audit_set_size=8)
    assert written == site_yamls(tmp_path / "sites")
    configs = [load_site_config(path) for path in written]
    assert [config.name for config in configs] == [f"sim_{i:03d}" for i in range(5)]
    sources = [config.data.labels_csv.parent.name for config in configs]
    assert sources == ["site_a", "site_b", "site_a", "site_b", "site_a"]
    assert all(config.data.root == config.data.labels_csv.parent for config in configs)
    assert len({config.state_dir for config in configs}) == 5
    for path, config in zip(written, configs, strict=True):
        assert config.state_dir == path.parent.resolve() / "state"
        assert config.reporting.audit_set_size == 8
        assert not config.reporting.share_example_images


def test_partition_maps_to_its_site_and_a_wrong_node_count_is_refused() -> None:
    yamls = ["a.yaml", "b.yaml", "c.yaml"]
    assert site_for_partition(yamls, {"partition-id": 2, "num-partitions": 3}) == "c.yaml"
    with pytest.raises(ValueError, match="4 virtual nodes but 3 site YAMLs"):
        site_for_partition(yamls, {"partition-id": 0, "num-partitions": 4})
    with pytest.raises(ValueError, match="partition-id"):
        site_for_partition(yamls, {"site-config": "a.yaml"})


def test_simulated_node_runs_the_client_app_as_its_site() -> None:
    seen = []

    def stub(message: Message, context: Context) -> Message:
        seen.append((message.metadata.message_type, context.node_config[SITE_CONFIG_KEY]))
        return Message(RecordDict(), reply_to=message)

    app = simulation_client_app([Path("a.yaml"), Path("b.yaml")], app=stub)
    context = Context(1, 11, {"partition-id": 1, "num-partitions": 2}, RecordDict(), {})
    with server_identity(1):
        for kind in ("train", "query.support", "evaluate"):
            sent = Message(
                RecordDict({"config": ConfigRecord({})}), dst_node_id=11, message_type=kind
            )
            sent.metadata.__dict__["_message_id"] = sent.object_id
            app(wire_copy(sent), context)
    assert seen == [("train", "b.yaml"), ("query.support", "b.yaml"), ("evaluate", "b.yaml")]


def test_run_and_backend_config_are_valid(tmp_path: Path) -> None:
    settings = RunSettings.from_run_config(run_config(30, tmp_path, rounds=2))
    assert (settings.min_sites, settings.rounds, settings.image_size) == (30, 2, 32)
    assert settings.tracking_uri == ""
    config = backend_config(2)
    assert config["init_args"]["num_cpus"] == 2
    assert config["client_resources"]["num_cpus"] == 1


def _round(seconds: float, train: list[float]) -> dict:
    return {
        "seconds": seconds,
        "sites": {
            "train": [{"status": "ok", "metrics": {"train.seconds": s}} for s in train]
            + [{"status": "failed", "reason": "config_error"}],
            "support": [{"status": "ok", "metrics": {"support.seconds": 0.5}} for _ in train],
            "evaluate": [{"status": "ok", "metrics": {"val.seconds": 1.0}} for _ in train],
        },
    }


def test_figures_from_a_round_log_and_memory_samples() -> None:
    trace = MemoryTrace()
    trace.add([(1, "python -m bench.scale_bench", 300 * MIB, 200 * MIB)])
    trace.add(
        [
            (1, "python -m bench.scale_bench", 310 * MIB, 210 * MIB),
            (7, "ray::ClientAppActor.run", 900 * MIB, 400 * MIB),
            (8, "ray::ClientAppActor.run", 1000 * MIB, 500 * MIB),
            (9, "ray::IDLE", 100 * MIB, 50 * MIB),
        ]
    )
    trace.add([(7, "ray::ClientAppActor", 950 * MIB, 450 * MIB)])
    rounds = [_round(60.0, [1.0, 1.0]), _round(8.0, [1.0, 2.0]), _round(10.0, [2.0, 2.0])]
    result = figures(2, rounds, trace)
    assert result["scale_2_round_s"] == 9.0  # the rounds after the first
    assert result["scale_2_first_round_s"] == 60.0
    assert result["scale_2_site_rss_mb"] == 1000.0
    assert result["scale_2_total_rss_mb"] == 2310.0
    assert result["scale_2_total_pss_mb"] == 1160.0
    assert result["scale_2_concurrent_sites"] == 2.0
    assert result["scale_2_site_compute_s"] == 6.5  # median of 6.0 and 7.0
    assert result["scale_2_rounds_done"] == 3.0
    partial = figures(100, [], MemoryTrace())
    assert math.isnan(partial["scale_100_round_s"]) and partial["scale_100_rounds_done"] == 0
