"""``python -m client synth`` and ``check`` through typer's runner."""

from __future__ import annotations

import csv
import subprocess
import sys
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


ROOT = Path(__file__).resolve().parents[2]


def test_top_level_help_lists_every_command_and_shows_examples() -> None:
    code, output = _run("--help")
    assert code == 0, output
    names = [info.name for info in app.registered_commands]
    assert {"synth", "check", "join", "keygen", "approve", "privacy", "pretrain"} <= set(names)
    for name in names:
        assert f"python -m client {name}" in output, name
    assert "Examples" in output


def test_help_imports_neither_torch_nor_flwr() -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['client', '--help']\n"
        "try:\n"
        "    runpy.run_module('client', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'monai'}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert completed.stdout.splitlines()[-1] == "[]", completed.stdout


def test_check_names_a_missing_data_root_as_join_does(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(
        "name: site_m\nstate_dir: s\n"
        "data: {format: dicom, root: gone, labels_csv: labels.csv, class_names: [a, b]}\n"
    )
    (tmp_path / "labels.csv").write_text("file,label\nx.dcm,a\n")
    code, output = _run("check", "--site", str(config))
    assert code == 1, output
    assert f"missing data root: data.root {tmp_path / 'gone'} is not a folder" in output
    assert "missing_file" not in output


def test_synth_still_takes_sites_with_a_warning(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-sites.yaml"
    for option in ("--sites-config", "--sites"):
        result = RUNNER.invoke(
            app, ["synth", "--out", str(tmp_path / "out"), option, str(missing)], env=WIDE
        )
        assert result.exit_code == 2, result.output
        assert "no-such-sites.yaml" in result.output  # the file was read as the sites list
    assert "warning: --sites is deprecated, use --sites-config" in result.stderr


class _StartedSuperNodeError(Exception):
    """Raised in place of starting the SuperNode: join got this far with these settings."""


def test_join_still_takes_port_with_a_warning_and_polls_at_the_shared_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from client.commands import join as join_module
    from sic_core.cli_vocabulary import POLL_INTERVAL_SECONDS
    from tests.server.fedkit import write_site

    polled: list[float] = []

    def started(**argv: object) -> list[str]:
        raise _StartedSuperNodeError(argv["port"])

    monkeypatch.setattr(os, "environ", dict(os.environ))  # join sets FLWR_HOME and PATH
    monkeypatch.setattr(join_module, "_wait_for_superlink", lambda *_: None)
    monkeypatch.setattr(join_module, "shorten_fleet_polling", polled.append)
    monkeypatch.setattr(join_module, "supernode_argv", started)
    site = write_site(tmp_path, "site_p")
    common = ["join", "--site", str(site), "--insecure", "--allow-any-app", "--cold"]
    for option in ("--local-port", "--port"):
        result = RUNNER.invoke(app, [*common, "--no-prepare", option, "9123"])
        assert isinstance(result.exception, _StartedSuperNodeError), result.output
        assert result.exception.args == (9123,)
    assert "warning: --port is deprecated, use --local-port" in result.stderr
    assert polled == [POLL_INTERVAL_SECONDS, POLL_INTERVAL_SECONDS]


def test_pretrain_writes_into_the_out_folder_and_still_takes_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import types

    import client.warm_start
    import sic_core.checkpoint
    from sic_core.cli_vocabulary import WARM_START_FILE

    saved: list[Path] = []
    history = types.SimpleNamespace(epochs=[1], final_loss=0.5)
    result = types.SimpleNamespace(
        model=None, metadata=dict, images=8, sites=["p"], history=history, seconds=1.0
    )
    result.stalled = False
    monkeypatch.setattr(client.warm_start, "public_warm_start", lambda *_, **__: result)
    monkeypatch.setattr(sic_core.checkpoint, "save_checkpoint", lambda p, *_, **__: saved.append(p))
    site = tmp_path / "public.yaml"
    site.write_text(
        "name: p\nstate_dir: s\ndata: {format: dicom, labels_csv: l.csv, class_names: [a, b]}\n"
    )
    for out in (tmp_path / "public", tmp_path / "old" / "init.pt"):
        outcome = RUNNER.invoke(app, ["pretrain", "--site", str(site), "--out", str(out)])
        assert outcome.exit_code == 0, outcome.output
    assert saved == [tmp_path / "public" / WARM_START_FILE, tmp_path / "old" / "init.pt"]
    assert "warning: --out FILE.pt is deprecated, use --out FOLDER" in outcome.stderr
