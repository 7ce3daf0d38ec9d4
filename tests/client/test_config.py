"""Site configs: strict schema, errors that name the field, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from client.config import DataFormat, SiteConfig, load_site_config
from sic_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "name": "site_x",
    "state_dir": "state",
    "data": {"format": "dicom", "labels_csv": "data/labels.csv", "class_names": ["a", "b"]},
}


def _write(tmp_path: Path, payload: object, name: str = "site.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(payload) if not isinstance(payload, str) else payload)
    return path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as raised:
        load_site_config(path)
    return str(raised.value)


def test_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, MINIMAL))
    assert config.seed == 0
    assert config.data.format is DataFormat.DICOM
    assert config.data.image_size == 128 and config.data.keep_colour is False
    assert config.preprocessing.percentiles == (0.5, 99.5) and config.preprocessing.augment
    assert config.training.batch_size == 32
    privacy = config.privacy
    assert (privacy.enabled, privacy.target_delta, privacy.max_epsilon) == (False, 1e-5, 8.0)
    assert (privacy.noise_multiplier, privacy.max_grad_norm) == (1.0, 1.0)
    assert (privacy.support_noise_multiplier, privacy.support_clip_norm) == (10.0, 1.0)
    assert config.reporting.share_example_images is False
    assert config.reporting.audit_set_size == 64


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, MINIMAL))
    assert config.state_dir == tmp_path.resolve() / "state"
    assert config.data.labels_csv == tmp_path.resolve() / "data" / "labels.csv"


def test_a_misspelt_field_is_named_with_a_suggestion(tmp_path: Path) -> None:
    payload = {**MINIMAL, "data": {**MINIMAL["data"], "imgae_size": 64}}
    message = _error(_write(tmp_path, payload))
    assert "site.yaml" in message
    assert "data.imgae_size: unknown field; did you mean 'image_size'?" in message
    top = _error(_write(tmp_path, {**MINIMAL, "privcy": {"enabled": True}}, "b.yaml"))
    assert "privcy: unknown field; did you mean 'privacy'?" in top


def test_enum_errors_list_the_allowed_values(tmp_path: Path) -> None:
    payload = {**MINIMAL, "data": {**MINIMAL["data"], "format": "dcm"}}
    message = _error(_write(tmp_path, payload))
    assert "data.format" in message
    assert "'dicom', 'medmnist' or 'folder'" in message and "'dcm'" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"format": "dicom", "class_names": ["a", "b"]}, "data.labels_csv is required"),
        ({"format": "medmnist", "class_names": ["a", "b"]}, "data.npz is required"),
        (
            {"format": "folder", "root": "x", "npz": "y.npz", "class_names": ["a", "b"]},
            "data.npz is not used",
        ),
        ({"format": "folder", "root": "x", "class_names": ["a", "a"]}, "unique"),
        ({"format": "folder", "root": "x", "class_names": ["a"]}, "data.class_names"),
        (
            {"format": "folder", "root": "x", "class_names": ["a", "b"], "image_size": 8},
            "data.image_size",
        ),
        (
            {
                "format": "folder",
                "root": "x",
                "class_names": ["a", "b"],
                "split_fractions": [1, 1, 0],
            },
            "summing to 1",
        ),
        (
            {"format": "folder", "root": "x", "class_names": ["a", "b"], "patient_id_pattern": "x"},
            "capture group",
        ),
    ],
)
def test_format_rules_name_the_field(tmp_path: Path, data: dict, expected: str) -> None:
    assert expected in _error(_write(tmp_path, {**MINIMAL, "data": data}))


def test_unreadable_files_are_config_errors(tmp_path: Path) -> None:
    assert "cannot read" in _error(tmp_path / "absent.yaml")
    assert "line 2" in _error(_write(tmp_path, "name: x\n  bad: [indent\n"))
    assert "mapping" in _error(_write(tmp_path, "- just\n- a list\n", "list.yaml"))


def test_configs_are_frozen(tmp_path: Path) -> None:
    config = load_site_config(_write(tmp_path, MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        config.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "path", sorted((ROOT / "site_configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_site_configs_are_valid(path: Path) -> None:
    assert isinstance(load_site_config(path), SiteConfig)


def _privacy(tmp_path: Path, **privacy: object) -> Path:
    return _write(tmp_path, {**MINIMAL, "privacy": {"enabled": True, **privacy}})


def test_epsilon_per_round_replaces_the_noise_multiplier(tmp_path: Path) -> None:
    privacy = load_site_config(_privacy(tmp_path, epsilon_per_round=2.0)).privacy
    assert privacy.epsilon_per_round == 2.0
    assert load_site_config(_privacy(tmp_path)).privacy.epsilon_per_round is None


def test_epsilon_per_round_and_noise_multiplier_are_mutually_exclusive(tmp_path: Path) -> None:
    message = _error(_privacy(tmp_path, epsilon_per_round=2.0, noise_multiplier=1.0))
    assert "privacy.noise_multiplier and privacy.epsilon_per_round are mutually exclusive" in (
        message
    )


def test_epsilon_per_round_must_fit_the_budget(tmp_path: Path) -> None:
    message = _error(_privacy(tmp_path, epsilon_per_round=9.0, max_epsilon=8.0))
    assert "privacy.epsilon_per_round (9.0) exceeds privacy.max_epsilon (8.0)" in message
    message = _error(_privacy(tmp_path, epsilon_per_round=0))
    assert "privacy.epsilon_per_round" in message and "greater than 0" in message
