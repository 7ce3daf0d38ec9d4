"""The final global model in the MLflow model registry, as a pyfunc: prediction plus evidence.

:func:`register_global_model` turns a round checkpoint (:meth:`RunFiles.write_checkpoint`)
into an MLflow 3 *logged model* of the federation's parent run, registers it as a new
version of ``sicfed-<study>`` and points an alias (``candidate`` by default) at it::

    import mlflow

    model = mlflow.pyfunc.load_model("models:/sicfed-demo@candidate")
    out = model.predict(images)  # float32 (N, C_in, S, S) in [0, 1]
    out["prediction"], out["probabilities"], out["logits"], out["evidence"]

The registered model carries everything needed to load it except its pip dependencies: a
slim model checkpoint (weights, support set, model config; loadable with
``torch.load(weights_only=True)``, like the round checkpoint, without its RNG and strategy
state) and, as ``code_paths``, a copy of :mod:`sic_core` and of this module.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import sic_core
from sic_core.calibration import Calibration, calibrated_probabilities
from sic_core.checkpoint import load_checkpoint as load_model_checkpoint
from sic_core.checkpoint import save_checkpoint as save_model_checkpoint
from sic_core.errors import ConfigError, SicfedError
from sic_core.head import class_scores
from sic_core.model import ModelConfig, SICModel
from sic_core.wire import SUPPORT_BUFFER_KEYS

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "MODEL_NAME",
    "ModelRegistryError",
    "SicPyfuncModel",
    "model_from_round_checkpoint",
    "pip_requirements",
    "register_global_model",
    "registered_model_name",
]

log = logging.getLogger(__name__)

#: Key of the model checkpoint in the pyfunc's ``artifacts`` (``context.artifacts``).
CHECKPOINT_ARTIFACT = "sic_checkpoint"
#: Name of the logged model inside the parent run (MLflow 3 ``LoggedModel`` name).
MODEL_NAME = "global_model"
#: Default number of images per forward pass in :meth:`SicPyfuncModel.predict`.
DEFAULT_BATCH_SIZE = 64


class ModelRegistryError(SicfedError):
    """The global model could not be registered (registry unreachable, bad checkpoint, ...)."""

    reason = "model_registry_error"


def registered_model_name(study: str) -> str:
    """The registered model of a study: ``sicfed-<study>``."""
    return f"sicfed-{study}"


def model_from_round_checkpoint(state: dict[str, Any]) -> SICModel:
    """Rebuild the global SIC model stored in a round checkpoint.

    Parameters
    ----------
    state
        A loaded round checkpoint (:func:`server.checkpoint.load_checkpoint`): ``arrays``
        (state dict without the support buffers), ``support_vectors`` ``(K, D)``,
        ``support_labels`` ``(K,)`` and ``model_config``.

    Returns
    -------
    SICModel
        In eval mode, on the CPU.

    Raises
    ------
    ModelRegistryError
        If a key is missing, the checkpoint has no support set yet, or the weights do not fit
        the model config.
    """
    missing = [key for key in ("arrays", "model_config") if key not in state]
    if missing:
        raise ModelRegistryError(f"round checkpoint: missing {', '.join(missing)}")
    if state.get("support_vectors") is None or state.get("support_labels") is None:
        raise ModelRegistryError("round checkpoint: no global support set (no support round ran)")
    try:
        model = SICModel(ModelConfig(**state["model_config"]))
        arrays = {key: torch.as_tensor(value) for key, value in state["arrays"].items()}
        result = model.load_state_dict(arrays, strict=False)
        # The support buffers travel separately (wire.SUPPORT_BUFFER_KEYS); anything else
        # missing or extra means the weights belong to another architecture.
        absent = set(result.missing_keys) - SUPPORT_BUFFER_KEYS
        if absent or result.unexpected_keys:
            raise ModelRegistryError(
                "round checkpoint: weights do not fit the model config "
                f"(missing {sorted(absent)}, unexpected {sorted(result.unexpected_keys)})"
            )
        model.set_support(
            torch.as_tensor(state["support_vectors"]), torch.as_tensor(state["support_labels"])
        )
    except (TypeError, ValueError, RuntimeError, SicfedError) as error:
        if isinstance(error, ModelRegistryError):
            raise
        raise ModelRegistryError(f"round checkpoint: cannot rebuild the model: {error}") from error
    return model.eval()


def _images_from_input(model_input: Any, config: ModelConfig, image_size: int | None) -> np.ndarray:
    """``(N, C_in, H, W)`` float32 array from a numpy array or a one-column DataFrame."""
    if hasattr(model_input, "columns"):  # a pandas DataFrame, without importing pandas here
        if len(model_input.columns) != 1:
            raise ValueError(
                "model_input: a DataFrame must have exactly one column of images, got "
                f"{len(model_input.columns)} columns"
            )
        rows = [np.asarray(value, dtype=np.float32) for value in model_input.iloc[:, 0]]
        if not rows:
            raise ValueError("model_input: the DataFrame is empty")
        images = np.stack(rows)
        if images.ndim == 2:  # flattened rows
            if image_size is None:
                raise ValueError("model_input: flattened rows need the model's image size")
            images = images.reshape(-1, config.in_channels, image_size, image_size)
    else:
        images = np.asarray(model_input)
    if images.ndim != 4 or images.shape[1] != config.in_channels:
        raise ValueError(
            f"model_input: expected shape (N, {config.in_channels}, H, W), got {images.shape}"
        )
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"model_input: expected float images in [0, 1], got {images.dtype}")
    return np.ascontiguousarray(images, dtype=np.float32)


class SicPyfuncModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper of a SIC model: prediction plus per-support evidence.

    ``predict`` takes images, float32 ``(N, C_in, S, S)`` in ``[0, 1]`` (the registered
    signature fixes ``C_in`` and ``S``; values outside ``[0, 1]`` raise ``ValueError``), or a
    DataFrame with one column holding one image per row (nested or flattened arrays), and
    returns a dict of numpy arrays:

    - ``prediction`` ``(N,)`` int64: ``argmax_c z_c``;
    - ``probabilities`` ``(N, C)`` float32: the calibrated class probabilities of
      :func:`sic_core.calibration.calibrated_probabilities` with the run's last federated
      calibration (rows sum to 1); a checkpoint without a calibration gives ``sigmoid(z_c)``,
      one-vs-rest as the model is trained with BCE (rows do not sum to 1);
    - ``logits`` ``(N, C)`` float32: ``z_c = sum_{k: y_k = c} e_k + b``;
    - ``evidence`` ``(N, K)`` float32: ``e_k = sim(f(x), s_k) / T`` of each support vector;
    - ``support_labels`` ``(K,)`` int64: the class ``y_k`` of each support vector;
    - ``bias`` ``(C,)`` float32: the logit bias ``b`` (the same for every class).

    Evidence needs no contribution maps, so it is one forward pass without gradients; for
    maps, load the checkpoint artifact with :func:`sic_core.load_checkpoint` and call
    :func:`sic_core.explain`. Runs on the CPU. Optional ``params={"batch_size": n}``.
    """

    def __init__(self) -> None:
        self._model: SICModel | None = None
        self._image_size: int | None = None
        self._calibration: Calibration | None = None

    def load_context(self, context: Any) -> None:
        """Rebuild the model from the checkpoint artifact (``weights_only`` load, CPU)."""
        checkpoint = load_model_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])
        self._model = checkpoint.model.eval()
        size = checkpoint.metadata.get("image_size")
        self._image_size = int(size) if size else None
        calibration = checkpoint.metadata.get("calibration")
        self._calibration = Calibration.from_dict(calibration) if calibration else None

    @property
    def model(self) -> SICModel:
        """The loaded SIC model (after :meth:`load_context`)."""
        if self._model is None:
            raise RuntimeError("SicPyfuncModel: load_context has not run")
        return self._model

    # ``model_input`` is annotated ``np.ndarray`` (a DataFrame works too): MLflow inspects
    # this hint when the class is defined, and any other hint (``Any``, a union) makes it warn
    # or try to infer a signature from it; ``np.ndarray`` is one it leaves alone.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Prediction, probabilities, logits and per-support evidence (see the class doc)."""
        model = self.model
        images = _images_from_input(model_input, model.config, self._image_size)
        batch_size = int((params or {}).get("batch_size") or DEFAULT_BATCH_SIZE)
        if batch_size < 1:
            raise ValueError(f"params.batch_size: expected a positive integer, got {batch_size}")
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(images[start : start + batch_size])
                chunks.append(model.evidence(model.embed(x)))
        evidence = torch.cat(chunks) if chunks else torch.zeros(0, len(model.support_labels))
        # The same sum the model's forward computes, so logits equal model(x) exactly.
        logits = class_scores(evidence, model.support_labels, model.num_classes) + model.logit_bias
        return {
            "prediction": logits.argmax(dim=1).numpy().astype(np.int64),
            "probabilities": (
                torch.sigmoid(logits)
                if self._calibration is None
                else calibrated_probabilities(logits, self._calibration).float()
            ).numpy(),
            "logits": logits.numpy(),
            "evidence": evidence.numpy(),
            "support_labels": model.support_labels.numpy().astype(np.int64),
            "bias": np.full(model.num_classes, model.logit_bias, dtype=np.float32),
        }


def pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc: the versions installed here.

    Explicit, because MLflow would otherwise infer them by loading the model in a subprocess
    (seconds per registration). Local version labels (``+cpu``) are dropped so that a CUDA
    build of the same torch version satisfies them.
    """
    packages = ("mlflow", "torch", "numpy", "bcos", "cloudpickle")
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in packages]


def _signature(config: ModelConfig, image_size: int | None, num_supports: int) -> ModelSignature:
    """Tensor signature; with a known image size every dimension but the batch is fixed."""
    side = image_size if image_size else -1
    float32, int64 = np.dtype(np.float32), np.dtype(np.int64)
    classes = config.num_classes
    return ModelSignature(
        inputs=Schema([TensorSpec(float32, (-1, config.in_channels, side, side))]),
        outputs=Schema(
            [
                TensorSpec(int64, (-1,), "prediction"),
                TensorSpec(float32, (-1, classes), "probabilities"),
                TensorSpec(float32, (-1, classes), "logits"),
                TensorSpec(float32, (-1, num_supports), "evidence"),
                TensorSpec(int64, (num_supports,), "support_labels"),
                TensorSpec(float32, (classes,), "bias"),
            ]
        ),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]),
    )


def _stage_code(target: Path) -> list[str]:
    """Copy what unpickling the model needs into ``target``; return the ``code_paths``.

    The pickled :class:`SicPyfuncModel` refers to ``server.registry`` by name, and the model to
    :mod:`sic_core`. Only this module goes into the staged ``server`` package (the app itself
    is not needed to predict); caches are left out.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    core = target / "sic_core"
    shutil.copytree(Path(sic_core.__file__).parent, core, ignore=ignore)
    server = target / "server"
    server.mkdir()
    here = Path(__file__).resolve()
    shutil.copy2(here.parent / "__init__.py", server / "__init__.py")
    shutil.copy2(here, server / "registry.py")
    return [str(core), str(server)]


def register_global_model(
    *,
    tracking_uri: str,
    run_id: str,
    checkpoint_path: Path,
    model_name: str,
    alias: str = "candidate",
    input_example: np.ndarray | None = None,
) -> str:
    """Log the global model of a round checkpoint as a pyfunc and register it.

    The model becomes an MLflow 3 logged model ``global_model`` of run ``run_id`` (linked to
    it at ``step`` = the checkpoint's round), then a new version of ``model_name`` with
    ``alias`` moved to it. Everything goes through one explicit :class:`MlflowClient`; no
    global MLflow state (tracking URI, active run, experiment) is read or changed.

    Loading the registered model needs the pinned packages of :func:`pip_requirements`
    (torch, numpy, bcos, mlflow); the sicfed code it needs (:mod:`sic_core` and this module)
    is stored with it as ``code_paths`` and put first on ``sys.path`` by MLflow when loading.
    In a process that has not imported the real ``server`` package yet, that staged
    ``server`` package (this module only) then shadows it.

    Parameters
    ----------
    tracking_uri
        Tracking server; also used as the registry URI.
    run_id
        The federation's parent run (``fed-<run>``).
    checkpoint_path
        A round checkpoint written by :meth:`server.checkpoint.RunFiles.write_checkpoint`.
    model_name
        Registered model name, by convention :func:`registered_model_name` of the study.
    alias
        Alias to point at the new version (``candidate``; ``approved`` is set by a person).
    input_example
        Float32 ``(N, C_in, S, S)`` images in ``[0, 1]`` stored with the model as its input
        example (default: one mid-grey image at the run's ``image-size``). Only public or
        synthetic images belong here: they are readable by everyone with registry access.

    Returns
    -------
    str
        The new registered model version.

    Raises
    ------
    ModelRegistryError
        If the checkpoint cannot be read or rebuilt, the run does not exist, or the tracking
        server or its registry fails (e.g. unreachable, or a store without a registry). The
        caller decides whether that ends the run; nothing is swallowed here. MLflow retries
        an unreachable server for minutes before it gives up
        (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, default 7 with exponential backoff).
    """
    # Imported here: the copy of this module stored with the model is unpickled in a staged
    # ``server`` package that holds no other module.
    from server.checkpoint import load_checkpoint as load_round_checkpoint

    checkpoint_path = Path(checkpoint_path)
    try:
        state = load_round_checkpoint(checkpoint_path)
    except ConfigError as error:
        raise ModelRegistryError(
            f"cannot read round checkpoint {checkpoint_path}: {error}"
        ) from error
    model = model_from_round_checkpoint(state)
    server_round = int(state.get("round", 0))
    run_config = state.get("run_config") or {}
    image_size = run_config.get("image-size")
    if input_example is not None:
        example = np.asarray(input_example)
        image_size = image_size or int(example.shape[-1])
        input_example = example.astype(np.float32, copy=False)
    elif image_size:
        # A mid-grey image: shows callers the expected payload and carries no patient data.
        shape = (1, model.config.in_channels, image_size, image_size)
        input_example = np.full(shape, 0.5, dtype=np.float32)
    num_supports = len(model.support_labels)

    try:
        # MLflow 3.17 refuses a plain file store here (it is in maintenance mode) unless
        # MLFLOW_ALLOW_FILE_STORE=true; even then its registry reads logged models through
        # the global tracking URI (by default creating ./mlflow.db). Use sqlite or a server.
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment_id = client.get_run(run_id).info.experiment_id
    except MlflowException as error:
        raise ModelRegistryError(
            f"model registry: cannot read run {run_id} at {tracking_uri}: {error.message}"
        ) from error

    logged = None
    try:
        logged = client.create_logged_model(
            experiment_id=experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            params={
                **{key: str(value) for key, value in model.config.to_dict().items()},
                "image_size": str(image_size),
                "round": str(server_round),
            },
            model_type="sic",
        )
        with tempfile.TemporaryDirectory(prefix="sicfed-register-") as tmp:
            tmp_path = Path(tmp)
            model_file = save_model_checkpoint(
                tmp_path / "sic_model.pt",
                model,
                metadata={
                    "round": server_round,
                    "image_size": image_size,
                    "run_id": run_id,
                    "calibration": state.get("calibration"),
                },
            )
            local = tmp_path / "model"
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=SicPyfuncModel(),
                artifacts={CHECKPOINT_ARTIFACT: str(model_file)},
                code_paths=_stage_code(tmp_path / "code"),
                pip_requirements=pip_requirements(),
                signature=_signature(model.config, image_size, num_supports),
                input_example=input_example,
                # Ties the MLmodel file to the logged model and run, as mlflow's log_model does.
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    model_uuid=logged.model_id,
                    run_id=run_id,
                    model_id=logged.model_id,
                ),
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=server_round)])
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)

        try:
            client.create_registered_model(
                model_name, description="SIC global model of a sicfed study (sicfed.server)"
            )
        except MlflowException as error:
            if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # The source is the logged model's storage location, not ``models:/<model_id>``:
        # MLflow's SQL registry store resolves a models:/ source with a new MlflowClient() on
        # the *global* tracking URI, not this client's. A tracking server needs model_id to
        # accept that source (the SQL store does not keep it).
        version = client.create_model_version(
            model_name,
            source=logged.artifact_location,
            run_id=run_id,
            tags={"round": str(server_round)},
            model_id=logged.model_id,
        )
        client.set_registered_model_alias(model_name, alias, version.version)
    except (MlflowException, OSError) as error:
        if logged is not None:
            _mark_failed(client, logged.model_id)
        message = error.message if isinstance(error, MlflowException) else str(error)
        raise ModelRegistryError(
            f"model registry: cannot register {model_name!r} at {tracking_uri}: {message}"
        ) from error
    log.info(
        "registered %s version %s (round %d) as @%s",
        model_name,
        version.version,
        server_round,
        alias,
    )
    return str(version.version)


def _mark_failed(client: MlflowClient, model_id: str) -> None:
    """Best effort: a half-logged model shows as FAILED instead of PENDING forever."""
    try:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    except MlflowException:
        log.debug("could not mark logged model %s as FAILED", model_id, exc_info=True)
