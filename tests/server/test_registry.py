"""The global model registered in MLflow as a pyfunc (sqlite tracking store in tmp_path).

Tests on the shared ``registry`` fixture are marked slow: MLflow's schema migrations for a new
sqlite store take 7-25 s on a busy 2-core machine, while the two registrations take about
2.5 s (first, imports included) and 0.4 s. Checkpoint errors are raised before MLflow is
contacted, so those tests need no store.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import mlflow.pyfunc
import mlflow.utils.environment
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from server.checkpoint import RunFiles
from server.registry import (
    CHECKPOINT_ARTIFACT,
    ModelRegistryError,
    SicPyfuncModel,
    model_from_round_checkpoint,
    register_global_model,
    registered_model_name,
)
from sic_core import create_model, unit_filter_state_dict
from sic_core.errors import SicfedError
from sic_core.wire import SUPPORT_BUFFER_KEYS

SIZE = 32
CLASSES = 2
N_SHOT = 2
NAME = registered_model_name("test")


def write_round_checkpoint(run_dir: Path, server_round: int, seed: int) -> Path:
    """A round checkpoint with the keys server/federation.py writes."""
    torch.manual_seed(seed)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=CLASSES, n_shot=N_SHOT)
    state = unit_filter_state_dict(model)
    proj_dim = model.config.proj_dim
    return RunFiles(run_dir, 7).write_checkpoint(
        server_round,
        {
            "arrays": {k: v.clone() for k, v in state.items() if k not in SUPPORT_BUFFER_KEYS},
            # Embeddings are non-negative after the ReLU, so are the support vectors.
            "support_vectors": torch.rand(CLASSES * N_SHOT, proj_dim),
            "support_labels": torch.arange(CLASSES).repeat_interleave(N_SHOT),
            "aggregator": "FedAvg",
            "aggregator_state": {},
            "sites": ["site_a", "site_b"],
            "rng": {},
            "mlflow": {"parent_run_id": "", "site_run_ids": {}},
            "model_config": model.config.to_dict(),
            "run_config": {"image-size": SIZE, "study": "test", "num-classes": CLASSES},
        },
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two registrations (rounds 1 and 2) of one run; timings of each."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment(
        "sicfed/test", artifact_location=(root / "artifacts").as_uri()
    )
    run_id = client.create_run(experiment, run_name="fed-7").info.run_id
    checkpoints = [write_round_checkpoint(root / "runs", r, seed=r) for r in (1, 2)]
    images = torch.rand(5, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    versions = []
    # MLflow infers requirements by loading the model in a fresh environment: slow, and what
    # the explicit pins avoid. Record whether it ever tries.
    inferred: list[tuple] = []
    infer = mlflow.utils.environment._infer_requirements

    def recording_infer(*args: object, **kwargs: object) -> list[str]:
        inferred.append(args)
        return infer(*args, **kwargs)

    with mock.patch("mlflow.utils.environment._infer_requirements", recording_infer):
        for checkpoint in checkpoints:
            versions.append(
                register_global_model(
                    tracking_uri=uri,
                    run_id=run_id,
                    checkpoint_path=checkpoint,
                    model_name=NAME,
                    input_example=images[:2].numpy(),
                )
            )
    aliased = client.get_model_version_by_alias(NAME, "candidate")
    # load_model resolves models:/ URIs through the global registry URI.
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    return {
        "client": client,
        "uri": uri,
        "run_id": run_id,
        "checkpoints": checkpoints,
        "versions": versions,
        "inferred": inferred,
        "aliased": aliased,
        "loaded": loaded,
        "images": images,
    }


def reference_model(checkpoint: Path):
    from server.checkpoint import load_checkpoint

    return model_from_round_checkpoint(load_checkpoint(checkpoint))


def test_model_name_convention() -> None:
    assert registered_model_name("demo") == "sicfed-demo"


@pytest.mark.slow
def test_second_registration_moves_the_alias(registry: dict) -> None:
    assert registry["versions"] == ["1", "2"]
    assert str(registry["aliased"].version) == "2"  # an int from the SQL store, str from REST
    assert registry["aliased"].tags["round"] == "2"
    assert registry["aliased"].run_id == registry["run_id"]
    first = registry["client"].get_model_version(NAME, "1")
    assert "candidate" not in first.aliases


@pytest.mark.slow
def test_registration_infers_no_requirements(registry: dict) -> None:
    # Explicit pip requirements: MLflow never loads the model in a new environment to
    # infer them (what made a registration take minutes).
    assert registry["inferred"] == []


@pytest.mark.slow
def test_logged_model_belongs_to_the_parent_run(registry: dict) -> None:
    client, run_id = registry["client"], registry["run_id"]
    run = client.get_run(run_id)
    outputs = run.outputs.model_outputs
    assert sorted(output.step for output in outputs) == [1, 2]
    # The SQL registry store keeps no model_id on a version; the source names the model.
    latest = max(outputs, key=lambda output: output.step)
    logged = client.get_logged_model(latest.model_id)
    assert registry["aliased"].source == logged.artifact_location
    assert logged.source_run_id == run_id
    assert logged.experiment_id == run.info.experiment_id
    assert str(logged.status) in ("READY", "LoggedModelStatus.READY")
    assert logged.params["round"] == "2"


@pytest.mark.slow
def test_predict_matches_the_model(registry: dict) -> None:
    images = registry["images"]
    out = registry["loaded"].predict(images.numpy())
    model = reference_model(registry["checkpoints"][1])
    with torch.no_grad():
        logits = model(images).numpy()
    k = CLASSES * N_SHOT
    assert out["prediction"].shape == (5,) and out["prediction"].dtype == np.int64
    assert out["probabilities"].shape == (5, CLASSES)
    assert out["logits"].shape == (5, CLASSES)
    assert out["evidence"].shape == (5, k)
    assert out["support_labels"].tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(out["prediction"], logits.argmax(axis=1))
    np.testing.assert_allclose(out["probabilities"], 1 / (1 + np.exp(-logits)), atol=1e-6)
    # Completeness of evidence: z_c = sum_{k in c} e_k + b.
    for c in range(CLASSES):
        summed = out["evidence"][:, out["support_labels"] == c].sum(axis=1) + out["bias"][c]
        np.testing.assert_allclose(summed, out["logits"][:, c], atol=1e-5, rtol=0)
    assert (out["evidence"] >= 0).all()


@pytest.mark.slow
def test_predict_accepts_a_dataframe_and_a_batch_size(registry: dict) -> None:
    images = registry["images"].numpy()
    loaded = registry["loaded"]
    expected = loaded.predict(images)["logits"]
    frame = pd.DataFrame({"image": [image.reshape(-1).tolist() for image in images]})
    np.testing.assert_allclose(loaded.predict(frame)["logits"], expected, atol=1e-6)
    batched = loaded.predict(images, params={"batch_size": 2})["logits"]
    np.testing.assert_allclose(batched, expected, atol=1e-6)


@pytest.mark.slow
def test_predict_rejects_bad_images(registry: dict) -> None:
    loaded = registry["loaded"]
    with pytest.raises(Exception, match=r"\[0, 1\]"):
        loaded.predict(np.full((1, 1, SIZE, SIZE), 2.0, dtype=np.float32))
    with pytest.raises(Exception, match=r"(?i)shape"):
        loaded.predict(np.zeros((1, 3, SIZE, SIZE), dtype=np.float32))


@pytest.mark.slow
def test_unwrapped_python_model_loads_the_artifact(registry: dict) -> None:
    """The raw PythonModel (no signature enforcement) also takes nested-array frames."""
    source = registry["client"].get_model_version_download_uri(NAME, "1")
    local = mlflow.artifacts.download_artifacts(artifact_uri=source)
    context = type("Context", (), {"artifacts": {}})()
    context.artifacts[CHECKPOINT_ARTIFACT] = str(next(Path(local).rglob("sic_model.pt")))
    python_model = SicPyfuncModel()
    python_model.load_context(context)
    images = registry["images"].numpy()
    frame = pd.DataFrame({"image": list(images)})
    out = python_model.predict(None, frame)
    model = reference_model(registry["checkpoints"][0])
    with torch.no_grad():
        np.testing.assert_allclose(out["logits"], model(registry["images"]).numpy(), atol=1e-5)


@pytest.mark.slow
def test_unknown_run_raises_a_sicfed_error(registry: dict) -> None:
    with pytest.raises(ModelRegistryError, match="cannot read run") as caught:
        register_global_model(
            tracking_uri=registry["uri"],
            run_id="0" * 32,
            checkpoint_path=registry["checkpoints"][0],
            model_name=NAME,
        )
    assert isinstance(caught.value, SicfedError)


@pytest.mark.slow
def test_store_without_registry_raises_a_sicfed_error(
    tmp_path: Path, registry: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow 3.17 refuses the file store (maintenance mode) unless explicitly allowed.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ModelRegistryError, match="model registry"):
        register_global_model(
            tracking_uri=(tmp_path / "mlruns").as_uri(),
            run_id=registry["run_id"],
            checkpoint_path=registry["checkpoints"][0],
            model_name=NAME,
        )


def test_checkpoint_without_support_is_refused(tmp_path: Path) -> None:
    path = RunFiles(tmp_path, 1).write_checkpoint(
        1,
        {
            "arrays": {},
            "support_vectors": None,
            "support_labels": None,
            "model_config": {"encoder": "bcos_cnn_small", "in_channels": 1, "num_classes": 2},
        },
    )
    with pytest.raises(ModelRegistryError, match="support"):
        register_global_model(
            tracking_uri="sqlite:///unused.db",
            run_id="unused",
            checkpoint_path=path,
            model_name=NAME,
        )


def test_unreadable_checkpoint_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelRegistryError, match="cannot read"):
        register_global_model(
            tracking_uri="sqlite:///unused.db",
            run_id="unused",
            checkpoint_path=tmp_path / "missing.pt",
            model_name=NAME,
        )


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_registration_through_a_tracking_server(tmp_path: Path) -> None:
    """The deployed path: `mlflow server` on loopback with proxied artifacts, as the demo runs.

    A tracking server validates a version's source against its run or logged model, which the
    direct sqlite store does not.
    """
    from server.coordinator import free_port, start_mlflow
    from server.processes import ProcessGroup, wait_http_ok

    with ProcessGroup() as group:
        uri = start_mlflow(
            group, tmp_path / "mlflow", port=free_port(5000), log_path=tmp_path / "mlflow.log"
        )
        wait_http_ok(f"{uri}/health", timeout=240, process=group.processes[-1])
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        run_id = client.create_run(client.create_experiment("sicfed/test")).info.run_id
        versions = [
            register_global_model(
                tracking_uri=uri,
                run_id=run_id,
                checkpoint_path=write_round_checkpoint(tmp_path / "runs", r, seed=r),
                model_name=NAME,
            )
            for r in (1, 2)
        ]
        assert versions == ["1", "2"]
        assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "2"
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(NAME, "2"),
            dst_path=str(tmp_path / "download"),
            tracking_uri=uri,
        )
        images = np.full((1, 1, SIZE, SIZE), 0.5, dtype=np.float32)
        out = mlflow.pyfunc.load_model(local).predict(images)
        model = reference_model(tmp_path / "runs" / "checkpoints" / "7" / "round_002.pt")
        with torch.no_grad():
            expected = model(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(out["logits"], expected, atol=1e-5, rtol=0)
