"""MLflow tracking of a federation run: one parent run, one child run per site.

The *server* logs every site's metrics into that site's child run with ``step=round``; sites
never talk to the tracking server. Metric keys follow METRICS.md: ``perf/*``, ``data/*``,
``dp/*``, ``time/*``, ``xai/*`` and outlier flags ``flag/*`` per site; cross-site summaries,
the dashboard thresholds (params ``xai_threshold/*``) and the federation summary report on the
parent run; each site's round report under ``reports/round_XXX/`` of its child run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from server.reports import threshold_params
from server.strategy import PhaseReport
from sic_core.wire import EvalMetric, SupportMetric, TrainMetric

__all__ = [
    "DEVICE_TAG",
    "EXPERIMENT_KIND",
    "EXPERIMENT_KIND_TAG",
    "SITE_METRIC_NAMES",
    "MlflowTracker",
    "StoredFederation",
    "experiment_name",
    "read_federation",
    "runs_table_url",
    "site_metric_name",
]

log = logging.getLogger(__name__)

#: Wire metric key per phase -> MLflow key in the site's child run.
SITE_METRIC_NAMES: dict[str, dict[str, str]] = {
    "train": {
        TrainMetric.NUM_EXAMPLES: "data/train_images",
        TrainMetric.LOSS: "train/loss",
        TrainMetric.EPOCHS: "train/epochs",
        TrainMetric.SECONDS: "time/train_s",
        TrainMetric.STARTUP: "time/train_startup_s",
        TrainMetric.QUARANTINED: "data/quarantined",
        TrainMetric.DP_EPSILON: "dp/epsilon",
        TrainMetric.COLLAPSED: "train/collapsed",
    },
    "support": {
        SupportMetric.NUM_EXAMPLES: "data/support_images",
        SupportMetric.CLASSES_PRESENT: "data/classes_present",
        SupportMetric.SECONDS: "time/support_s",
        SupportMetric.STARTUP: "time/support_startup_s",
    },
    "evaluate": {
        EvalMetric.NUM_EXAMPLES: "data/val_images",
        EvalMetric.LOSS: "perf/loss",
        EvalMetric.AUROC: "perf/auroc",
        EvalMetric.BALANCED_ACCURACY: "perf/balanced_accuracy",
        EvalMetric.ACCURACY: "perf/accuracy",
        EvalMetric.AUROC_GLOBAL_SUPPORT: "perf/auroc_global_support",
        EvalMetric.LOCAL_SUPPORTS: "support/local_supports",
        EvalMetric.ECE: "perf/ece",
        EvalMetric.ECE_RAW: "perf/ece_raw",
        EvalMetric.AUROC_CI_LOW: "perf/auroc_ci_low",
        EvalMetric.AUROC_CI_HIGH: "perf/auroc_ci_high",
        EvalMetric.SECONDS: "time/eval_s",
        EvalMetric.STARTUP: "time/eval_startup_s",
        EvalMetric.XAI_SECONDS: "time/xai_s",
    },
}


#: Tag of a site's child run: the device it computed on, as the site names it (``cpu``,
#: ``cuda:0 <GPU model>``); set when first seen and whenever it changes.
DEVICE_TAG = "sicfed.device"


def site_metric_name(phase: str, key: str) -> str | None:
    """The MLflow key of a site's wire metric (``xai/*`` keep theirs), ``None`` if not logged."""
    if phase == "evaluate" and key.startswith(("xai/", "why/")):
        return key
    return SITE_METRIC_NAMES[phase].get(key)


def experiment_name(study: str) -> str:
    """The MLflow experiment of a study: ``sicfed/<study>``."""
    return f"sicfed/{study}"


#: MLflow 3's record of an experiment's kind (what its UI's kind selector writes): classic
#: model training, so the experiment is listed with its runs, not as a GenAI app (traces,
#: token usage).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: The UI's "GenAI / Model training" switch as a query parameter. MLflow 3.17's UI picks the
#: experiment's first page from this switch (default GenAI: the overview of traces) and no
#: longer from the tag, so the links sicfed prints carry it.
_WORKFLOW_QUERY = "workflowType=machine_learning"


def runs_table_url(tracking_uri: str, experiment_id: str) -> str | None:
    """The MLflow UI page with the experiment's runs table, ``None`` for a non-HTTP store.

    Parameters
    ----------
    tracking_uri
        The tracking server, e.g. ``http://127.0.0.1:5000``.
    experiment_id
        The experiment's id.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{_WORKFLOW_QUERY}"


class MlflowTracker:
    """Logs a federation run to an MLflow tracking server with explicit run ids.

    Parameters
    ----------
    tracking_uri
        e.g. ``http://127.0.0.1:5000``.
    study
        Experiment ``sicfed/<study>``.
    run_name
        Parent run name (``fed-<flower run id>``).
    params
        Parent run parameters (the run settings).
    """

    def __init__(self, tracking_uri: str, study: str, run_name: str, params: dict[str, str]):
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.study = study
        self.run_name = run_name
        self.params = params
        self.experiment_id = ""
        self.parent_run_id = ""
        self.site_run_ids: dict[str, str] = {}
        self.site_devices: dict[str, str] = {}

    def start(self) -> str:
        """Create (or find) the experiment and open the parent run; return its id.

        The experiment is tagged as classic model development (:data:`EXPERIMENT_KIND_TAG`);
        the runs table's address (:func:`runs_table_url`) is logged.
        """
        name = experiment_name(self.study)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(
                name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = experiment.experiment_id
            # Experiments made before the tag existed (or by hand) are set up the same way.
            if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(
                    self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
        run = self.client.create_run(self.experiment_id, run_name=self.run_name)
        self.parent_run_id = run.info.run_id
        params = {**self.params, **threshold_params()}
        self.client.log_batch(
            self.parent_run_id,
            params=[Param(key, value) for key, value in sorted(params.items())],
        )
        log.info("MLflow parent run %s in experiment %s", self.parent_run_id, name)
        url = runs_table_url(self.tracking_uri, self.experiment_id)
        if url is not None:
            log.info("MLflow runs table: %s", url)
        return self.parent_run_id

    def resume(self, parent_run_id: str, site_run_ids: dict[str, str]) -> None:
        """Continue logging into an earlier run's parent and site runs (``server resume``).

        Runs that a crash left marked FAILED or KILLED are set RUNNING again.
        """
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id
        self.parent_run_id = parent_run_id
        self.site_run_ids = dict(site_run_ids)
        for run_id in (parent_run_id, *self.site_run_ids.values()):
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        log.info("MLflow: resuming parent run %s", parent_run_id)

    def site_run(self, site: str) -> str:
        """The child run of ``site`` (created on first use)."""
        if site not in self.site_run_ids:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"site-{site}",
                tags={"mlflow.parentRunId": self.parent_run_id, "sicfed.site": site},
            )
            self.site_run_ids[site] = run.info.run_id
        return self.site_run_ids[site]

    def log_round(
        self,
        server_round: int,
        reports: Iterable[PhaseReport],
        summary: dict[str, float],
        flags: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        """Log each site's metrics and outlier flags (``step=server_round``) and the summary.

        A site's device (:data:`DEVICE_TAG`) is tagged on its child run when it first
        names one and when it changes.
        """
        stamp = int(time.time() * 1000)
        reports = tuple(reports)
        per_site: dict[str, list[Metric]] = {}
        devices = {
            outcome.site: outcome.device
            for report in reports
            for outcome in report.outcomes
            if outcome.device and self.site_devices.get(outcome.site) != outcome.device
        }
        for site, site_flags in (flags or {}).items():
            per_site.setdefault(site, []).extend(
                Metric(key, float(value), stamp, server_round) for key, value in site_flags.items()
            )
        for report in reports:
            for outcome in report.outcomes:
                metrics = per_site.setdefault(outcome.site, [])
                metrics.append(
                    Metric(
                        f"fed/{report.phase}_ok", float(outcome.status == "ok"), stamp, server_round
                    )
                )
                for key, value in outcome.metrics.items():
                    if key == EvalMetric.AUROC and outcome.metrics[EvalMetric.AUROC_DEFINED] < 1:
                        continue
                    name = site_metric_name(report.phase, key)
                    # nan marks a metric that does not apply at the site: nothing to log.
                    if name is not None and math.isfinite(value):
                        metrics.append(Metric(name, value, stamp, server_round))
        try:
            for site, device in sorted(devices.items()):
                self.client.set_tag(self.site_run(site), DEVICE_TAG, device)
                self.site_devices[site] = device
            for site, metrics in sorted(per_site.items()):
                self.client.log_batch(self.site_run(site), metrics=metrics)
            self.client.log_batch(
                self.parent_run_id,
                metrics=[
                    Metric(key, value, stamp, server_round)
                    for key, value in sorted(summary.items())
                ],
            )
        except Exception as error:  # tracking must not stop a federation
            log.warning("MLflow logging of round %d failed: %s", server_round, error)

    def log_site_report(self, site: str, server_round: int, folder: Path) -> None:
        """The site's round report (JSON and HTML) as ``reports/round_XXX/`` of its child run."""
        self._log_artifacts(self.site_run(site), folder, f"reports/round_{server_round:03d}")

    def log_federation_summary(self, paths: Iterable[Path]) -> None:
        """The federation summary files as ``reports/`` of the parent run."""
        for path in paths:
            self._log_artifacts(self.parent_run_id, path, "reports")

    def _log_artifacts(self, run_id: str, path: Path, artifact_path: str) -> None:
        try:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(run_id, str(path), artifact_path)
        except Exception as error:  # tracking must not stop a federation
            log.warning("MLflow upload of %s failed: %s", artifact_path, error)

    def finish(self, status: str) -> None:
        """Close the site runs and the parent run with ``FINISHED`` or ``FAILED``."""
        terminal = RunStatus.to_string(
            RunStatus.FINISHED if status == "completed" else RunStatus.FAILED
        )
        for run_id in self.site_run_ids.values():
            self.client.set_terminated(run_id, status=terminal)
        self.client.set_terminated(self.parent_run_id, status=terminal)


@dataclass
class StoredFederation:
    """What MLflow holds of a federation run's explanation reporting.

    Attributes
    ----------
    run
        The parent run's name (``fed-<run id>``).
    values
        round -> site -> ``perf/*`` and ``xai/*`` values.
    flags
        round -> site -> ``flag/*`` values.
    reports
        round -> site -> the report JSON the server stored.
    """

    run: str
    values: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    flags: dict[int, dict[str, dict[str, int]]] = field(default_factory=dict)
    reports: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)


def read_federation(client: MlflowClient, parent_run_id: str, scratch: Path) -> StoredFederation:
    """Read every site's metric histories and stored reports of a federation run.

    Parameters
    ----------
    client
        A client of the tracking server that holds the run.
    parent_run_id
        The federation's parent run.
    scratch
        An empty folder for the downloaded report files.
    """
    parent = client.get_run(parent_run_id)
    stored = StoredFederation(run=parent.info.run_name or parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
    )
    for child in children:
        site = child.data.tags.get("sicfed.site") or child.info.run_name.removeprefix("site-")
        for key in child.data.metrics:
            is_flag = key.startswith("flag/")
            if not (is_flag or key.startswith(("perf/", "xai/", "why/"))):
                continue
            target = stored.flags if is_flag else stored.values
            for metric in client.get_metric_history(child.info.run_id, key):
                value = int(metric.value) if is_flag else metric.value
                target.setdefault(metric.step, {}).setdefault(site, {})[key] = value
        folders = [a.path for a in client.list_artifacts(child.info.run_id, "reports") if a.is_dir]
        for folder in folders:
            server_round = int(folder.rsplit("_", 1)[-1])
            local = client.download_artifacts(
                child.info.run_id, f"{folder}/report.json", str(scratch / site)
            )
            report = json.loads(Path(local).read_text())
            stored.reports.setdefault(server_round, {})[site] = report
    return stored
