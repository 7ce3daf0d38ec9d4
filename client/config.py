"""Site configuration: one YAML file per hospital, validated into frozen pydantic models.

Every default lives in the models below and nowhere else. Relative paths in the YAML file
resolve against the folder that holds the file, so a site folder can be moved as a whole.

Examples
--------
>>> config = load_site_config("site_configs/synthcxr_site_a.yaml")  # doctest: +SKIP
>>> config.data.class_names
['normal', 'nodule']
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from client.app_approval import APP_HASH_PATTERN
from sic_core.errors import ConfigError

__all__ = [
    "COMPUTE_DEVICE_PATTERN",
    "ComputeConfig",
    "DataConfig",
    "DataFormat",
    "FederationConfig",
    "PreprocessingConfig",
    "PrivacyConfig",
    "ReportingConfig",
    "SiteConfig",
    "TrainingConfig",
    "load_site_config",
]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Resolve a relative path against the YAML file's folder (when loaded from a file)."""
    value = value.expanduser()
    base_dir = (info.context or {}).get("base_dir")
    if base_dir is not None and not value.is_absolute():
        return Path(base_dir) / value
    return value


#: A path that, when the config comes from a file, is relative to that file's folder.
SitePath = Annotated[Path, AfterValidator(_resolve_path)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataFormat(StrEnum):
    """How a site stores its images."""

    DICOM = "dicom"
    MEDMNIST = "medmnist"
    FOLDER = "folder"


class DataConfig(_Section):
    """Where the site's images are and how to read them."""

    format: DataFormat = Field(
        description="how the images are stored: a DICOM folder with labels.csv, a MedMNIST "
        ".npz, or a folder per class"
    )
    labels_csv: SitePath | None = Field(
        None, description="dicom: CSV with file, label, patient_id[, split, mask, ...]"
    )
    root: SitePath | None = Field(
        None, description="folder: root/<class_name>/*.png; dicom: base of `file` paths"
    )
    npz: SitePath | None = Field(None, description="medmnist: the .npz file")
    class_names: list[str] = Field(min_length=2, description="label map: index = label")
    image_size: int = Field(
        128, ge=16, le=1024, description="side in pixels every image is resized to (square)"
    )
    keep_colour: bool = Field(
        False, description="keep RGB channels (false: convert to one grey channel)"
    )
    allowed_modalities: list[str] | None = Field(
        None, description="DICOM Modality values accepted (e.g. [CR, DX]); null = any"
    )
    frame: int | None = Field(None, ge=0, description="frame to take from multi-frame DICOM")
    max_decoded_megabytes: float = Field(
        512.0, gt=0, description="memory guard: declared decoded size per file"
    )
    split_fractions: tuple[float, float, float] = Field(
        (0.7, 0.15, 0.15), description="train/val/test shares when the data has no split"
    )
    patient_id_pattern: str | None = Field(
        None,
        description="folder: regex with one group that extracts the patient id from a file name",
    )

    @field_validator("class_names")
    @classmethod
    def _unique_class_names(cls, value: list[str]) -> list[str]:
        if any(not name.strip() for name in value):
            raise ValueError("class names must be non-empty")
        duplicates = sorted({name for name in value if value.count(name) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, repeated: {duplicates}")
        return value

    @field_validator("allowed_modalities")
    @classmethod
    def _upper_modalities(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("give at least one modality, or null to accept any")
        return [modality.strip().upper() for modality in value]

    @field_validator("split_fractions")
    @classmethod
    def _fractions_sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, ...]:
        if any(share < 0 for share in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError(f"expected three non-negative shares summing to 1, got {value}")
        if value[0] <= 0:
            raise ValueError("the train share must be positive")
        return value

    @field_validator("patient_id_pattern")
    @classmethod
    def _compiles_with_one_group(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
        if compiled.groups != 1:
            raise ValueError("the pattern needs exactly one capture group (the patient id)")
        return value

    @model_validator(mode="after")
    def _fields_match_format(self) -> DataConfig:
        needed = {
            DataFormat.DICOM: {"labels_csv"},
            DataFormat.MEDMNIST: {"npz"},
            DataFormat.FOLDER: {"root"},
        }[self.format]
        allowed = {
            DataFormat.DICOM: {"labels_csv", "root", "allowed_modalities", "frame"},
            DataFormat.MEDMNIST: {"npz"},
            DataFormat.FOLDER: {"root", "patient_id_pattern"},
        }[self.format]
        format_fields = {
            "labels_csv",
            "root",
            "npz",
            "allowed_modalities",
            "frame",
            "patient_id_pattern",
        }
        for name in sorted(needed):
            if getattr(self, name) is None:
                raise ValueError(f"data.{name} is required when data.format is '{self.format}'")
        for name in sorted(format_fields - allowed):
            if getattr(self, name) is not None:
                raise ValueError(f"data.{name} is not used when data.format is '{self.format}'")
        return self


class PreprocessingConfig(_Section):
    """Intensity scaling and training augmentation (applied per batch, never cached)."""

    percentiles: tuple[float, float] = Field(
        (0.5, 99.5), description="intensity percentiles mapped to 0 and 1 (then clipped)"
    )
    augment: bool = Field(True, description="random training augmentation per batch")
    augment_probability: float = Field(0.8, ge=0, le=1, description="chance per transform")
    rotate_degrees: float = Field(10.0, ge=0, le=180, description="largest random rotation")
    translate_fraction: float = Field(0.05, ge=0, le=0.5, description="of the image side")
    scale_fraction: float = Field(0.1, ge=0, lt=1, description="largest random zoom, ±")
    noise_std: float = Field(0.02, ge=0, le=1, description="Gaussian noise, [0, 1] units")
    contrast_gamma: tuple[float, float] = Field(
        (0.8, 1.25), description="range of the random gamma (contrast) adjustment"
    )

    @field_validator("percentiles")
    @classmethod
    def _ordered_percentiles(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError(f"expected 0 <= low < high <= 100, got {value}")
        return value

    @field_validator("contrast_gamma")
    @classmethod
    def _ordered_gamma(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"expected 0 < low <= high, got {value}")
        return value


class TrainingConfig(_Section):
    """Per-site overrides of the federation's training settings."""

    batch_size: int = Field(32, ge=1, description="images per local training step")


class PrivacyConfig(_Section):
    """Differential privacy for this site (sample-level DP-SGD and a noised support release).

    The noise of local DP-SGD is set in one of two ways (giving both is an error):

    - ``noise_multiplier`` (default 1.0): the same σ every round, whatever the site's size;
      a small site then pays more ε per round (its sample rate ``batch_size / N`` is
      larger);
    - ``epsilon_per_round``: the ε(δ) that one round may cost on its own, i.e. the round's
      DP-SGD composed with its support release in a fresh accountant at ``target_delta``.
      Before each round the site solves for the DP-SGD σ that reaches it (Opacus'
      ``get_noise_multiplier`` search, given the round's sample rate, number of steps and
      the support release's cost); every site then spends the same per round. Rounds
      compose sub-linearly under RDP: with ``epsilon_per_round: 2`` (batch 32, 2 local
      epochs) the total ε at δ = 1e-5 is 2.0 after one round, 2.6-2.8 after two and 3.6-3.9
      after four, for 560-140 training images (σ 1.28-2.13); the ledger, not this figure,
      is authoritative.

    Whichever is used, the site's total over its whole life never exceeds ``max_epsilon``:
    a round that would pass it is refused (``privacy_budget_exhausted``).

    ``support_noise_multiplier`` defaults to 10: the support release is a full-data Gaussian
    mechanism (sample rate 1), so at 1.0 it alone spends about 6 of an ε budget of 8 per
    round. With 10 (and DP-SGD at 1.0, batch 32 of 560 images, 2 local epochs) ε at δ = 1e-5
    is 3.3 after one round, 4.1 after two, 5.5 after four and 6.6 after six.
    """

    enabled: bool = Field(False, description="train with DP-SGD and release supports with noise")
    target_delta: float = Field(1e-5, gt=0, lt=1, description="δ at which ε is accounted")
    max_epsilon: float = Field(
        8.0, gt=0, description="lifetime budget: a round that would pass it is refused"
    )
    noise_multiplier: float = Field(
        1.0, ge=0, description="DP-SGD noise σ, the same every round (or epsilon_per_round)"
    )
    epsilon_per_round: float | None = Field(
        None, gt=0, description="ε one round may cost; sets the DP-SGD noise each round"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    support_noise_multiplier: float = Field(
        10.0, ge=0, description="noise σ of the support release, in units of its clip norm"
    )
    support_clip_norm: float = Field(
        1.0, gt=0, description="each embedding is clipped to this norm before release"
    )

    @model_validator(mode="after")
    def _one_way_to_set_the_noise(self) -> PrivacyConfig:
        if self.epsilon_per_round is None:
            return self
        if "noise_multiplier" in self.model_fields_set:
            raise ValueError(
                "privacy.noise_multiplier and privacy.epsilon_per_round are mutually "
                "exclusive: epsilon_per_round sets the noise multiplier every round; remove "
                "one of them"
            )
        if self.epsilon_per_round > self.max_epsilon:
            raise ValueError(
                f"privacy.epsilon_per_round ({self.epsilon_per_round}) exceeds "
                f"privacy.max_epsilon ({self.max_epsilon}): not even one round would fit"
            )
        return self


class ReportingConfig(_Section):
    """What the site's report may contain when it leaves the site."""

    share_example_images: bool = Field(
        False, description="let the report that leaves the site carry images (false: redacted)"
    )
    audit_set_size: int = Field(
        64, ge=1, description="validation cases explained and measured every round"
    )


#: What ``compute.device`` accepts: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
COMPUTE_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class ComputeConfig(_Section):
    """Where the site computes (training, DP-SGD, support statistics, evaluation, audit)."""

    device: str = Field(
        "auto",
        description="auto (the first CUDA GPU if there is one, else the CPU), cpu, cuda (the "
        "first CUDA GPU) or cuda:N (GPU number N); a GPU asked for but missing stops "
        "`client check` and `client join` with an error, never a fall-back to the CPU",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if COMPUTE_DEVICE_PATTERN.fullmatch(value) is None:
            raise ValueError("expected auto, cpu, cuda or cuda:N (N the GPU's number)")
        return value


class FederationConfig(_Section):
    """What the site accepts from the federation's coordinator."""

    approved_apps: list[str] = Field(
        default_factory=list,
        description="hashes of the app bundles this site runs (`python -m server app-hash`)",
    )

    @field_validator("approved_apps")
    @classmethod
    def _app_hashes(cls, value: list[str]) -> list[str]:
        for item in value:
            if APP_HASH_PATTERN.fullmatch(item) is None:
                raise ValueError(f"{item!r} is not an app hash (sha256: and 64 hex digits)")
        return value


class SiteConfig(_Section):
    """One hospital's configuration, as loaded from its ``site.yaml``."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="site pseudonym, e.g. site_a (no spaces; it appears in reports)",
    )
    seed: int = Field(0, ge=0, description="seeds the site's splits, sampling and audit set")
    state_dir: SitePath = Field(description="cache, quarantine report and privacy ledger")
    data: DataConfig
    preprocessing: PreprocessingConfig = PreprocessingConfig()
    training: TrainingConfig = TrainingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    reporting: ReportingConfig = ReportingConfig()
    compute: ComputeConfig = ComputeConfig()
    federation: FederationConfig = FederationConfig()


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site YAML file.

    Parameters
    ----------
    path
        The site's YAML file. Relative paths inside it resolve against its folder.

    Returns
    -------
    SiteConfig
        The validated, frozen configuration.

    Raises
    ------
    ConfigError
        When the file is missing, is not YAML, or a field is unknown or invalid; the message
        names the file and every offending field (with "did you mean" for misspelt keys).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the site config ({error.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of site settings at the top level")
    try:
        return SiteConfig.model_validate(raw, context={"base_dir": path.resolve().parent})
    except ValidationError as error:
        problems = "\n".join(f"  - {line}" for line in describe_validation_error(error, SiteConfig))
        raise ConfigError(f"{path}: invalid site config:\n{problems}") from None


def describe_validation_error(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """Turn pydantic's errors into one line per problem, naming the dotted field.

    Parameters
    ----------
    error
        The validation error raised for ``model``.
    model
        The model that was validated (used to suggest field names for misspelt keys).

    Returns
    -------
    list of str
        Lines such as ``data.fromat: unknown field; did you mean 'format'?``.
    """
    lines = []
    for item in error.errors(include_url=False):
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _model_at(model, item["loc"][:-1])
            known = sorted(parent.model_fields) if parent is not None else []
            hint = difflib.get_close_matches(str(item["loc"][-1]), known, n=1, cutoff=0.6)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"{location}: unknown field{suggestion} (known: {', '.join(known)})")
            continue
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        if item["type"] != "missing" and isinstance(given, str | int | float | bool):
            message = f"{message} (got {given!r})"
        lines.append(f"{location}: {message}")
    return lines


def _model_at(model: type[BaseModel], location: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model class that a validation location points into, if any."""
    current: type[BaseModel] = model
    for part in location:
        if isinstance(part, int):
            continue  # an index into a list of models
        field = current.model_fields.get(str(part))
        nested = _nested_model(field.annotation) if field is not None else None
        if nested is None:
            return None
        current = nested
    return current


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation such as ``Model``, ``list[Model]``, ``Model | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in get_args(annotation):
        found = _nested_model(argument)
        if found is not None:
            return found
    return None
