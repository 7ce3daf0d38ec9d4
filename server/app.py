"""Flower ServerApp of sicfed (``serverapp = "server.app:app"`` in pyproject.toml).

Reads the run config (:class:`server.settings.RunSettings`), builds the initial SIC model,
the strategy and the MLflow tracker, and runs :func:`server.federation.run_federation`.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from server.audit import AuditEvent, AuditLog, actor_here, file_sha256, json_sha256
from server.checkpoint import RunFiles, restore_rng_state
from server.federation import run_federation
from server.resume import find_resume_point, restore_strategy, resumed_settings, round_arrays
from server.run_watch import ServerAppHeartbeat
from server.settings import RunSettings
from server.sites import SiteDirectory
from server.strategy import SicStrategy, TooFewSitesError, make_aggregator, with_central_dp
from server.tracking import MlflowTracker
from server.update_bound import UpdateNormBound
from server.warm_start import load_initial_weights
from sic_core import anchor_support, create_model, unit_filter_state_dict
from sic_core.errors import SicfedError
from sic_core.wire import SUPPORT_BUFFER_KEYS, ConfigKey

__all__ = ["app", "build_strategy", "initial_weights", "main", "round_configs"]

log = logging.getLogger(__name__)

app = ServerApp()


def initial_weights(settings: RunSettings) -> tuple[ArrayRecord, dict]:
    """Seeded initial weights (B-cos filters at unit length) and the model config.

    With ``initial-weights`` set, the weights come from that checkpoint (a public warm
    start, :mod:`server.warm_start`).
    """
    torch.manual_seed(settings.seed)
    model = create_model(
        settings.encoder,
        in_channels=1,
        num_classes=settings.num_classes,
        n_shot=settings.n_shot,
        proj_dim=settings.proj_dim,
    )
    if settings.initial_weights:
        load_initial_weights(model, settings.initial_weights)
    state = unit_filter_state_dict(model)
    arrays = ArrayRecord(
        {
            key: Array(value.cpu().numpy())
            for key, value in state.items()
            if key not in SUPPORT_BUFFER_KEYS
        }
    )
    return arrays, model.config.to_dict()


def round_configs(settings: RunSettings) -> tuple[ConfigRecord, ConfigRecord]:
    """The ``train`` and the ``evaluate``/``support`` round configs sent to sites."""
    spec = settings.model_spec()
    train = ConfigRecord(
        {
            **spec,
            str(ConfigKey.LOCAL_EPOCHS): settings.local_epochs,
            str(ConfigKey.LR): settings.lr,
            str(ConfigKey.BATCH_SIZE): settings.batch_size,
            str(ConfigKey.SEED): settings.seed,
            str(ConfigKey.DP): settings.dp,
            str(ConfigKey.ANCHOR_ROUNDS): settings.anchor_rounds,
        }
    )
    evaluate = ConfigRecord(
        {**spec, str(ConfigKey.SEED): settings.seed, str(ConfigKey.DP): settings.dp}
    )
    return train, evaluate


def build_strategy(settings: RunSettings, sites: SiteDirectory | None = None) -> SicStrategy:
    """The SIC strategy over the aggregator named in the run config.

    With ``central-dp`` the aggregator is wrapped in Flower's client-side fixed-clipping
    central DP (:func:`server.strategy.with_central_dp`), and the adaptive update bound is
    off: the sites' own clipping already bounds every update. Otherwise updates are clipped
    to ``update-clip-factor`` x the running median norm (:mod:`server.update_bound`).
    """
    aggregator: Strategy = make_aggregator(
        settings.strategy,
        fraction_train=settings.fraction_train,
        fraction_evaluate=settings.fraction_evaluate,
        min_sites=settings.min_sites,
        proximal_mu=settings.proximal_mu,
        server_lr=settings.server_lr,
        trim_beta=settings.trim_beta,
        byzantine_sites=settings.byzantine_sites,
    )
    if settings.central_dp:
        aggregator = with_central_dp(
            aggregator,
            settings.strategy,
            noise_multiplier=settings.central_dp_noise,
            clipping_norm=settings.central_dp_clip,
            num_sampled_sites=settings.min_sites,
        )
    return SicStrategy(
        aggregator,
        num_classes=settings.num_classes,
        n_shot=settings.n_shot,
        proj_dim=settings.proj_dim,
        node_wait=settings.node_wait,
        max_update_norm=settings.max_update_norm,
        # Under central DP every site already clips its update to central-dp-clip.
        update_bound=(
            UpdateNormBound(settings.update_clip_factor)
            if settings.update_clip_factor and not settings.central_dp
            else None
        ),
        merge_seed=settings.seed,
        sites=sites,
        # Under DP the anchor rounds keep the public anchors as the global support set (sites
        # train against them) instead of spending privacy on a support release.
        public_support_rounds=settings.anchor_rounds if settings.dp else 0,
        min_accepted=settings.min_sites,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one federation as configured by ``context.run_config``.

    With ``resume-run`` set, continue that run after its last complete round instead
    (:mod:`server.resume`).
    """
    settings = RunSettings.from_run_config(dict(context.run_config))
    resume = None
    if settings.resume_run:
        resume = find_resume_point(RunFiles(settings.resolved_run_dir(), settings.resume_run))
        settings = resumed_settings(resume, settings)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    if resume is None:
        arrays, model_config = initial_weights(settings)
    else:
        arrays, model_config = round_arrays(resume.state), dict(resume.state["model_config"])
    strategy = build_strategy(settings)
    strategy.support = anchor_support(
        settings.num_classes, settings.n_shot, settings.proj_dim, seed=settings.seed
    )
    if resume is not None:
        restore_strategy(strategy, resume.state)
    strategy.summary()
    train_config, evaluate_config = round_configs(settings)
    # A resumed run goes on writing into the original run's files, audit log and MLflow runs.
    files = RunFiles(settings.resolved_run_dir(), settings.resume_run or context.run_id)
    audit = AuditLog(files.audit_path, files.run_id)
    if resume is None:
        audit.append(
            AuditEvent.RUN_STARTED,
            actor=actor_here("serverapp"),
            details=_start_details(settings, grid),
        )
    else:
        audit.append(
            AuditEvent.RUN_RESUMED,
            actor=actor_here("serverapp"),
            details={
                "from_round": resume.server_round,
                "checkpoint_sha256": file_sha256(resume.checkpoint_path),
                "flower_run_id": str(context.run_id),
                "app_hash": grid.run.fab_hash,
            },
        )
    tracker = None
    if settings.tracking_uri:
        tracker = MlflowTracker(
            settings.tracking_uri,
            settings.study,
            run_name=f"fed-{files.run_id}",
            params=settings.as_params(),
        )
        if resume is None:
            tracker.start()
        else:
            mlflow_ids = resume.state.get("mlflow") or {}
            tracker.resume(mlflow_ids["parent_run_id"], mlflow_ids.get("site_run_ids", {}))
    # What `server run`, `status` and `resume` need to close the MLflow runs of a run that
    # died without recording it (see server.run_watch).
    tracking = {
        "tracking_uri": settings.tracking_uri,
        "mlflow_parent_run_id": tracker.parent_run_id if tracker is not None else "",
        "flower_run_id": str(context.run_id),
    }
    if resume is not None:
        tracking["resumed_from_round"] = resume.server_round
    first_round = 1
    if resume is not None:
        # Last, so that nothing above draws from the RNGs the next round continues with.
        restore_rng_state(resume.state["rng"])
        first_round = resume.server_round + 1
    try:
        # Beating before "running" is written: a follower never sees a running run with a
        # stale heartbeat (a killed ServerApp leaves its last one behind).
        with ServerAppHeartbeat(files):
            files.write_status("running", rounds=settings.rounds, **tracking)
            run_federation(
                grid,
                strategy,
                initial_arrays=arrays,
                num_rounds=settings.rounds,
                first_round=first_round,
                train_config=train_config,
                evaluate_config=evaluate_config,
                timeout=settings.round_timeout,
                poll_interval=settings.poll_interval,
                files=files,
                tracker=tracker,
                checkpoint_extra={
                    "model_config": model_config,
                    "run_config": settings.model_dump(by_alias=True),
                },
            )
    except BaseException as error:
        reason = error.reason if isinstance(error, SicfedError) else "server_error"
        log.exception("federation run %s failed (%s)", context.run_id, reason)
        # Which sites were missing and why (e.g. every site refused the app bundle).
        left_out = error.details() if isinstance(error, TooFewSitesError) else {}
        detail = {"detail": str(error)} if left_out else {}
        files.write_status(
            "failed", rounds=settings.rounds, reason=reason, **detail, **left_out, **tracking
        )
        audit.append(
            AuditEvent.RUN_FAILED,
            actor=actor_here("serverapp"),
            details={"reason": reason, **left_out},
        )
        if tracker is not None:
            tracker.finish("failed")
        raise
    files.write_status("completed", rounds=settings.rounds, **tracking)
    audit.append(
        AuditEvent.RUN_COMPLETED,
        actor=actor_here("serverapp"),
        details={"rounds": settings.rounds},
    )
    if tracker is not None:
        _register_final_model(settings, tracker, files)
        tracker.finish("completed")


def _start_details(settings: RunSettings, grid: Grid) -> dict[str, Any]:
    """The ``run_started`` audit details: what ran (app hash) and how (config hash)."""
    weights = settings.initial_weights
    weights_path = Path(weights).expanduser().resolve() if weights else None
    return {
        "config_hash": json_sha256(settings.model_dump(by_alias=True)),
        # Flower's hash of the app bundle it runs (what `flwr list` shows, shortened).
        "app_hash": grid.run.fab_hash,
        "strategy": settings.strategy,
        "rounds": settings.rounds,
        "initial_weights": str(weights_path or ""),
        "initial_weights_sha256": (
            file_sha256(weights_path) if weights_path and weights_path.is_file() else ""
        ),
    }


def _register_final_model(settings: RunSettings, tracker: MlflowTracker, files: RunFiles) -> None:
    """Register the last round's global model as ``sicfed-<study>@candidate`` (best effort).

    A registry failure does not fail a finished federation: the checkpoint stays on disk.
    """
    from server.registry import register_global_model, registered_model_name

    try:
        version = register_global_model(
            tracking_uri=settings.tracking_uri,
            run_id=tracker.parent_run_id,
            checkpoint_path=files.checkpoint_path(settings.rounds),
            model_name=registered_model_name(settings.study),
        )
    except SicfedError as error:
        log.warning("the final global model was not registered: %s", error)
        return
    log.info("final global model: %s version %s", registered_model_name(settings.study), version)
