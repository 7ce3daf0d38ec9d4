"""``python -m client synth`` and ``check`` through typer's runner."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client.cli import app

RUNNER = CliRunner()
WIDE = {"COLUMNS": "200"}


def _run(*args: str) -> tuple[int, str]:
    result = RUNNER.invoke(app, list(args), env=WIDE)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "synth"
    code, output = _run("synth", "--out", str(out), "--size", "32", "--scale", "0.05")
    assert code == 0, output
    assert "site_b" in output and "held out" in output
    return out


def test_help_lists_commands_with_examples() -> None:
    code, output = _run("--help")
    assert code == 0 and "synth" in output and "check" in output
    for command in ("synth", "check"):
        code, output = _run(command, "--help")
        assert code == 0 and "Examples" in output and "python -m client" in output


def test_synth_then_check_a_site(generated: Path) -> None:
    assert (generated / "manifest.json").is_file()
    site = generated / "site_a" / "site.yaml"
    code, output = _run("check", "--site", str(site))
    assert code == 0, output
    assert "Site site_a can train." in output and "No file was skipped." in output
    assert "train" in output and "nodule" in output and "decoded" in output
    code, output = _run("check", "--site", str(site))
    assert code == 0 and "40 images from the cache, 0 decoded" in output


def test_check_rejects_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "state_dir": "state",
                "data": {"format": "dicom", "labels_csv": "l.csv", "class_names": ["a", "b"]},
                "privacy": {"max_epsilom": 3},
            }
        )
    )
    code, output = _run("check", "--site", str(config))
    assert code == 2
    assert "privacy.max_epsilom: unknown field; did you mean 'max_epsilon'?" in output


def test_check_explains_why_a_site_cannot_train(generated: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader((generated / "site_c" / "labels.csv").open()))
    for row in rows:
        if row["label"] == "1":
            row["file"] = "dicom/missing.dcm" if row is rows[1] else row["file"] + ".gone"
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = tmp_path / "site.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "site_c_broken",
                "state_dir": "state",
                "data": {
                    "format": "dicom",
                    "labels_csv": "labels.csv",
                    "root": str(generated / "site_c"),
                    "class_names": ["normal", "nodule"],
                    "image_size": 32,
                },
            }
        )
    )
    code, output = _run("check", "--site", str(config), "--list-files")
    assert code == 1, output
    assert "missing_file" in output and "cannot train" in output and "nodule" in output
    assert ".gone" in output  # --list-files shows the local file names
    labels.write_text("oops\n1\n")
    code, output = _run("check", "--site", str(config))
    assert code == 1 and "source_error" in output


def test_synth_refuses_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    code, output = _run("synth", "--out", str(tmp_path), "--size", "32", "--scale", "0.01")
    assert code == 2 and "not empty" in output
    assert (tmp_path / "notes.txt").read_text() == "keep me"
