"""Run settings: the ``[tool.flwr.app.config]`` table, validated.

Run-config keys are kebab-case (``local-epochs``); Python names are snake_case. Defaults live
in ``pyproject.toml`` (that table is what ``flwr run`` sends); an override on the command line
(``--run-config 'rounds=5'``) must name a key that exists there.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sic_core.cli_vocabulary import POLL_INTERVAL_SECONDS
from sic_core.errors import ConfigError
from sic_core.wire import ConfigKey

__all__ = ["RunSettings"]


class RunSettings(BaseModel):
    """Everything the ServerApp reads from the run config.

    Attributes
    ----------
    rounds
        Federated rounds (train, support, evaluate, checkpoint).
    local_epochs, lr, batch_size
        Local training per round at every site.
    encoder, image_size, num_classes, n_shot, proj_dim
        The global SIC model.
    strategy
        ``fedavg`` (default), ``fedprox``, ``fedadam``, ``fedmedian``, ``fedtrimmedavg``,
        ``krum`` or ``multikrum`` (averages the ``n - byzantine_sites`` best-scored updates).
    proximal_mu, server_lr, trim_beta
        FedProx's mu, FedAdam's server learning rate, FedTrimmedAvg's cut fraction.
    byzantine_sites
        Malicious sites Krum and Multi-Krum assume (``f``; they need
        ``min_sites >= 2 f + 3``).
    fraction_train, fraction_evaluate, min_sites
        Site sampling.
    seed
        Seeds node sampling, the initial model and the support merge.
    dp
        Train with DP-SGD at the sites (each site's own privacy settings apply; a site whose
        config enables privacy trains with DP regardless).
    anchor_rounds
        First rounds in which sites train against the public class anchors (spreads the
        embeddings of a randomly initialised encoder); later rounds follow ``train_sic``'s
        recipe (episodic with the anchored term once the embeddings separate the classes).
        Default 4 = the default ``rounds``: measured in-process on SynthCXR easy (FedAvg over
        sites A-C, 2 local epochs), anchors in every round gave mean site AUROC 0.68 / 0.86 /
        0.91 / 0.95 after rounds 1-4, one anchor round then the switch 0.68 / 0.82 / 0.86 /
        0.93.
    initial_weights
        A sicfed checkpoint to start from instead of a random initialisation (typically a
        public warm start from ``python -m client pretrain``; empty: random). Relative: to
        the SuperLink's folder.
    central_dp, central_dp_noise, central_dp_clip
        Client-level central DP (Flower's ``DifferentialPrivacyClientSideFixedClipping``
        around the aggregator, ``fixedclipping_mod`` at the sites): every site's update is
        clipped to ``central_dp_clip`` and the mean gets Gaussian noise of standard deviation
        ``central_dp_noise * central_dp_clip / min_sites``. Off by default; fedavg/fedprox
        only.
    max_update_norm
        Reject train replies whose update norm exceeds this fixed bound (0 disables).
    update_clip_factor
        Clip every accepted update to this many times the running (lower) median norm of
        the updates of the last rounds (:mod:`server.update_bound`; 0 disables; off under
        ``central_dp``, whose sites clip their updates themselves).
    round_timeout, node_wait
        Seconds to wait for replies per phase, and for enough sites.
    poll_interval
        Seconds between the ServerApp's requests for the sites' replies (default
        :data:`sic_core.cli_vocabulary.POLL_INTERVAL_SECONDS`, as the sites' own polling).
    run_dir
        The folder of ``runs/<run id>/`` (round log, status, audit log, reports) and
        ``checkpoints/<run id>/`` (relative: to the SuperLink's folder); ``python -m server
        run`` sets it to the coordinator's ``--home``.
    tracking_uri, study
        MLflow tracking server (empty: no tracking) and the study (experiment
        ``sicfed/<study>``).
    resume_run
        Continue this earlier run after its last complete round (0: a new run); set by
        ``python -m server resume`` (:mod:`server.resume`).
    """

    # No populate_by_name: a field name (local_epochs) is not a run-config key, and Flower
    # would refuse it only later, as "Invalid run configuration".
    model_config = ConfigDict(frozen=True, extra="forbid")

    rounds: int = Field(4, ge=1)
    local_epochs: int = Field(2, ge=1, alias="local-epochs")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(32, ge=1, alias="batch-size")
    encoder: str = "bcos_cnn_small"
    image_size: int = Field(64, ge=16, alias="image-size")
    num_classes: int = Field(2, ge=2, alias="num-classes")
    n_shot: int = Field(3, ge=1, alias="n-shot")
    proj_dim: int = Field(128, ge=1, alias="proj-dim")
    strategy: str = "fedavg"
    proximal_mu: float = Field(0.01, ge=0, alias="proximal-mu")
    server_lr: float = Field(0.1, gt=0, alias="server-lr")
    trim_beta: float = Field(0.2, ge=0, lt=0.5, alias="trim-beta")
    byzantine_sites: int = Field(1, ge=0, alias="byzantine-sites")
    fraction_train: float = Field(1.0, gt=0, le=1, alias="fraction-train")
    fraction_evaluate: float = Field(1.0, gt=0, le=1, alias="fraction-evaluate")
    min_sites: int = Field(2, ge=1, alias="min-sites")
    seed: int = Field(0, ge=0)
    dp: bool = False
    anchor_rounds: int = Field(4, ge=0, alias="anchor-rounds")
    initial_weights: str = Field("", alias="initial-weights")
    central_dp: bool = Field(False, alias="central-dp")
    central_dp_noise: float = Field(1.0, ge=0, alias="central-dp-noise")
    central_dp_clip: float = Field(1.0, gt=0, alias="central-dp-clip")
    max_update_norm: float = Field(0.0, ge=0, alias="max-update-norm")
    update_clip_factor: float = Field(3.0, ge=0, alias="update-clip-factor")
    round_timeout: float = Field(900.0, gt=0, alias="round-timeout")
    node_wait: float = Field(120.0, gt=0, alias="node-wait")
    poll_interval: float = Field(POLL_INTERVAL_SECONDS, gt=0, le=10, alias="poll-interval")
    run_dir: str = Field("runs", alias="run-dir")
    tracking_uri: str = Field("", alias="tracking-uri")
    study: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    resume_run: int = Field(0, ge=0, alias="resume-run")

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        from sic_core.encoders import list_encoders

        known = list_encoders()
        if value not in known:
            raise ValueError(f"unknown encoder {value!r} (choose from {', '.join(known)})")
        return value

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        from server.strategy import STRATEGIES  # torch and flwr: only when a run names one

        if value.lower() not in STRATEGIES:
            hint = difflib.get_close_matches(value.lower(), list(STRATEGIES), n=1)
            raise ValueError(
                f"unknown strategy {value!r}"
                + (f"; did you mean {hint[0]!r}?" if hint else "")
                + f" (choose from {', '.join(STRATEGIES)})"
            )
        return value

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Validate a Flower run config.

        Raises
        ------
        ConfigError
            Naming every offending key (kebab-case, as written in the run config).
        """
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as error:
            valid = cls.run_config_keys()
            lines = []
            unknown = False
            for item in error.errors(include_url=False):
                key = ".".join(str(part) for part in item["loc"]) or "(run config)"
                message = item["msg"].removeprefix("Value error, ")
                if item["type"] == "extra_forbidden":
                    unknown = True
                    kebab = key.replace("_", "-")
                    hint = [kebab] if kebab in valid else difflib.get_close_matches(key, valid, n=1)
                    message = "unknown run-config key" + (
                        f"; did you mean {hint[0]!r}?" if hint else ""
                    )
                lines.append(f"  - {key}: {message}")
            if unknown:
                lines.append(f"valid keys: {', '.join(valid)}")
            raise ConfigError("invalid run config:\n" + "\n".join(lines)) from None

    @classmethod
    def run_config_keys(cls) -> list[str]:
        """Every run-config key, as written in ``[tool.flwr.app.config]`` (kebab-case)."""
        return [field.alias or name for name, field in cls.model_fields.items()]

    def resolved_run_dir(self) -> Path:
        """``run_dir`` as an absolute path."""
        return Path(self.run_dir).expanduser().resolve()

    def model_spec(self) -> dict[str, int | str]:
        """The model keys every message carries (see :class:`sic_core.wire.ConfigKey`)."""
        return {
            str(ConfigKey.ENCODER): self.encoder,
            str(ConfigKey.NUM_CLASSES): self.num_classes,
            str(ConfigKey.N_SHOT): self.n_shot,
            str(ConfigKey.PROJ_DIM): self.proj_dim,
            str(ConfigKey.IMAGE_SIZE): self.image_size,
        }

    def as_params(self) -> dict[str, str]:
        """Settings as MLflow parameters (kebab-case keys, string values)."""
        return {key: str(value) for key, value in self.model_dump(by_alias=True).items()}
