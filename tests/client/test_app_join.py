"""``python -m client join``: SuperNode arguments, shortened polling, the warm launcher."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client.cli import app
from client.commands import join as join_module
from client.commands.join import WARM_MODULES, shorten_fleet_polling, supernode_argv
from tests.server.fedkit import write_site

runner = CliRunner()


def test_supernode_argv_points_at_the_absolute_site_config(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_j")
    argv = supernode_argv(
        site_yaml=site,
        superlink="10.0.0.1:8000",
        port=9100,
        insecure=False,
        root_certificates=Path("/ca.crt"),
        auth_key=None,
    )
    assert argv[:5] == ["flower-supernode", "--superlink", "10.0.0.1:8000", "--port", "9100"]
    assert "--insecure" not in argv and argv[argv.index("--root-certificates") + 1] == "/ca.crt"
    assert argv[-1] == f'site-config="{site.resolve()}"'


def test_join_needs_tls_or_an_explicit_insecure(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_k")
    result = runner.invoke(app, ["join", "--site", str(site), "--no-prepare"])
    assert result.exit_code != 0
    assert "--insecure" in result.output


def test_join_names_the_bad_field_of_a_site_config(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("name: site_x\nstate_dir: s\ndata: {format: dicom, class_name: [a, b]}\n")
    result = runner.invoke(app, ["join", "--site", str(site), "--insecure"])
    assert result.exit_code == 2
    assert "class_name" in result.output and str(site) in result.output.replace("\n", "")


def test_shortened_polling_caps_only_the_supernode_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode import start_client_internal as loop

    assert "time.sleep(3)" in inspect.getsource(loop)  # the loop this targets is still there
    slept: list[float] = []
    monkeypatch.setattr(loop, "time", loop.time)  # restored after the test
    monkeypatch.setattr(time, "sleep", slept.append)
    shorten_fleet_polling(0.25)
    loop.time.sleep(3)
    loop.time.sleep(0.1)
    assert slept == [0.25, 0.1]
    assert loop.time.monotonic is time.monotonic
    with pytest.raises(RuntimeError, match="already shortened"):
        shorten_fleet_polling(0.5)


def test_warm_modules_hold_no_project_package() -> None:
    assert not {m.split(".")[0] for m in WARM_MODULES} & {"client", "server", "sic_core"}


def test_warm_launcher_forks_flwr_clientapp_for_the_shim(tmp_path: Path) -> None:
    log = tmp_path / "launcher.log"
    with open(log, "wb") as stream:
        launcher = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; "
                "from client.commands.join import start_warm_launcher; "
                f"start_warm_launcher(Path({str(tmp_path)!r}), 'site_w', "
                "modules=('flwr.clientapp',)).wait()",
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        shim = tmp_path / "bin" / "flwr-clientapp"
        deadline = time.monotonic() + 60
        while not shim.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        completed = subprocess.run(
            [str(shim), "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        assert completed.returncode == 0, completed.stderr
        deadline = time.monotonic() + 60
        while "--runtime-api-address" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "--runtime-api-address" in log.read_text()  # flwr-clientapp's own help
    finally:
        from server.processes import stop_pid_group

        stop_pid_group(launcher.pid)
        launcher.wait(timeout=10)


def test_join_module_keeps_help_fast() -> None:
    """Heavy libraries are imported inside the command, not when the CLI loads."""
    source = inspect.getsource(join_module).split("def join(")[0]
    assert (
        "import torch" not in source
        and "from client.data" not in source.split("def _check_site_data")[0]
    )


def test_cold_start_is_an_option() -> None:
    result = runner.invoke(app, ["join", "--help"])
    assert "--cold" in result.output and "--warm" in result.output


def _join(site: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        app,
        ["join", "--site", str(site), "--insecure", "--allow-any-app", *extra],
        env={"COLUMNS": "300"},
    )
    return result.exit_code, result.output.replace("\n", " ")


class _ReachedSuperLinkError(Exception):
    """Raised in place of probing the SuperLink: the data checks let the site through."""


@pytest.fixture
def no_superlink(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(address: str, root_certificates: Path | None) -> None:
        raise _ReachedSuperLinkError(address)

    monkeypatch.setattr(join_module, "_wait_for_superlink", reached)


def test_join_names_a_missing_data_root(tmp_path: Path, no_superlink: None) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(
        "name: site_m\nstate_dir: s\ndata: {format: folder, root: gone, class_names: [a, b]}\n"
    )
    for extra in ((), ("--no-prepare",)):
        code, output = _join(site, *extra)
        assert code == 1, output
        assert "missing data root: data.root" in output and str(tmp_path / "gone") in output
    result = runner.invoke(
        app,
        [
            "join",
            "--site",
            str(site),
            "--insecure",
            "--allow-any-app",
            "--no-prepare",
            "--allow-empty",
        ],
    )
    assert isinstance(result.exception, _ReachedSuperLinkError)
    assert "warning (--allow-empty)" in result.output


def test_join_refuses_a_site_without_validation_images(tmp_path: Path, no_superlink: None) -> None:
    site = write_site(tmp_path, "site_v", val_per_class=(0, 0))
    code, output = _join(site)
    assert code == 1, output
    assert "the val split is empty" in output and "--allow-empty" in output
    result = runner.invoke(
        app, ["join", "--site", str(site), "--insecure", "--allow-any-app", "--allow-empty"]
    )
    assert isinstance(result.exception, _ReachedSuperLinkError)  # warned, then went on to connect


def test_join_refuses_labels_outside_the_class_list(tmp_path: Path, no_superlink: None) -> None:
    site = write_site(tmp_path, "site_l", train_per_class=(8, 8, 8))
    config = yaml.safe_load(site.read_text())
    config["data"]["class_names"] = ["class0", "class1"]  # the archive also has label 2
    site.write_text(yaml.safe_dump(config))
    code, output = _join(site)
    assert code == 1, output
    assert "8 image(s) have labels outside the class list" in output
    assert "bad_label" in output


def test_join_lets_a_site_with_usable_data_through(tmp_path: Path, no_superlink: None) -> None:
    result = runner.invoke(
        app,
        ["join", "--site", str(write_site(tmp_path, "site_ok")), "--insecure", "--allow-any-app"],
    )
    assert isinstance(result.exception, _ReachedSuperLinkError), result.output
