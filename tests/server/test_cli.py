"""The coordinator CLI without a federation: help, argument checks, staging, tables."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from server.cli import app
from server.commands.run import parse_overrides
from server.coordinator import free_port, round_table
from server.flower_cli import format_run_config
from server.processes import ProcessGroup, pid_alive, process_tree
from server.settings import RunSettings
from server.staging import stage_app
from sic_core.errors import ConfigError

runner = CliRunner()


@pytest.mark.parametrize("command", ["start", "run", "resume", "status", "stop", "demo"])
def test_every_command_has_help_with_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "python -m server" in result.output


def test_start_refuses_a_public_superlink_without_tls(tmp_path: Path) -> None:
    result = runner.invoke(app, ["start", "--home", str(tmp_path), "--host", "0.0.0.0"])
    assert result.exit_code != 0
    assert "loopback" in result.output
    assert not (tmp_path / "pids.json").exists()


def test_run_without_a_started_coordinator_says_how_to_start(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", "--home", str(tmp_path)])
    assert result.exit_code == 1
    assert "python -m server start" in result.output


def test_demo_rejects_an_unsupported_image_size() -> None:
    result = runner.invoke(app, ["demo", "--size", "96"])
    assert result.exit_code != 0
    assert "64 or 128" in result.output


def test_overrides_are_read_as_toml_values() -> None:
    assert parse_overrides(["rounds=5", "strategy=fedprox", "dp=true", "lr=0.01"]) == {
        "rounds": 5,
        "strategy": "fedprox",
        "dp": True,
        "lr": 0.01,
    }
    assert format_run_config({"rounds": 5, "study": "a b", "dp": False}) == (
        'rounds=5 study="a b" dp=false'
    )


def test_bad_run_config_names_every_key() -> None:
    with pytest.raises(ConfigError) as error:
        RunSettings.from_run_config({"rounds": 0, "strategy": "fedavg", "bogus": 1})
    assert "rounds" in str(error.value) and "bogus: unknown run-config key" in str(error.value)


def test_run_config_defaults_in_pyproject_are_valid() -> None:
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    table = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    settings = RunSettings.from_run_config(table)
    assert settings.model_dump(by_alias=True).keys() == table.keys()


def test_staging_copies_only_the_allowlisted_app_files(tmp_path: Path) -> None:
    staged = stage_app(tmp_path)
    assert staged.name == "sicfed-app"
    files = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert {"pyproject.toml", "server/app.py", "client/app.py", "sic_core/wire.py"} <= files
    assert not any(f.startswith(("tests/", "bench/", "client/commands/")) for f in files)
    assert all(f.endswith(".py") or f == "pyproject.toml" for f in files)


def _project_imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in modules if m.split(".")[0] in {"client", "server", "sic_core"}}


def test_the_staged_app_holds_every_project_module_its_apps_import(tmp_path: Path) -> None:
    staged = stage_app(tmp_path)
    # Follow imports from both apps through the staged files only: a module the allowlist
    # misses fails at the sites of a real deployment (Flower's exit code 607), not here.
    pending, seen = ["client.app", "server.app"], set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        candidates = [
            staged.joinpath(*parts).with_suffix(".py"),
            staged.joinpath(*parts, "__init__.py"),
        ]
        found = [c for c in candidates if c.exists()]
        if not found:
            parent = staged.joinpath(*parts[:-1])
            # "from package import name" may name a variable, not a module.
            assert (parent / "__init__.py").exists() or parent.with_suffix(".py").exists(), module
            continue
        for path in found:
            pending.extend(_project_imports(path))
    assert {"client.round_report", "client.synth.render", "server.reports"} <= seen


def test_staging_rejects_a_pattern_that_matches_nothing(tmp_path: Path) -> None:
    source = tmp_path / "checkout"
    (source / "server").mkdir(parents=True)
    (source / "server" / "app.py").write_text("")
    (source / "pyproject.toml").write_text(
        '[tool.flwr.app]\nfab-include = ["server/*.py", "missing/*.py"]\n'
    )
    with pytest.raises(ConfigError, match="missing"):
        stage_app(tmp_path / "out", source=source)


def test_round_table_shows_site_aurocs_and_problems() -> None:
    entry = {
        "round": 2,
        "seconds": 12.5,
        "summary": {"perf/mean_site_auroc": 0.8, "train/loss": 0.5},
        "sites": {
            "train": [
                {"site": "site_b", "status": "failed", "reason": "data_error", "metrics": {}}
            ],
            "evaluate": [
                {"site": "site_a", "status": "ok", "reason": "", "metrics": {"val.auroc": 0.9}},
                {"site": "site_b", "status": "failed", "reason": "data_error", "metrics": {}},
            ],
        },
    }
    table = round_table([entry])
    cells = [[str(cell) for cell in column._cells] for column in table.columns]
    assert cells[1] == ["0.800"] and cells[2] == ["0.900"] and cells[3] == ["data_error"]
    assert cells[5] == ["site_b:train:data_error, site_b:evaluate:data_error"]
    console = Console(width=200, record=True)
    console.print(table)
    assert "site_b:train:data_error" in console.export_text()  # ":train:" is not an emoji


def test_free_port_avoids_a_busy_port() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert free_port(taken) != taken


def test_process_group_stops_children_that_started_their_own_session(tmp_path: Path) -> None:
    """Flower's helpers (e.g. the SuperLink's SuperExec) start their own session."""
    script = tmp_path / "spawn.py"
    script.write_text(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(600)\n"
    )
    with ProcessGroup() as group:
        parent = group.start(
            "spawner", [sys.executable, str(script)], log_path=tmp_path / "log", env=None
        )
        deadline = time.monotonic() + 30
        while len(process_tree(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert len(tree) == 3
    assert [pid for pid in tree if pid_alive(pid)] == []


def test_pid_file_lists_what_stop_will_stop(tmp_path: Path) -> None:
    with ProcessGroup() as group:
        group.start(
            "sleeper",
            [sys.executable, "-c", "import time; time.sleep(600)"],
            log_path=tmp_path / "log",
            env=None,
        )
        group.write_pid_file(tmp_path / "pids.json")
        recorded = json.loads((tmp_path / "pids.json").read_text())
        assert recorded["sleeper"]["pid"] == group.processes[0].pid
        result = runner.invoke(app, ["stop", "--home", str(tmp_path)])
        assert result.exit_code == 0 and "stopped sleeper" in result.output
        assert not pid_alive(recorded["sleeper"]["pid"])


def test_flower_cli_is_on_the_path_of_this_python() -> None:
    from server.processes import venv_bin

    completed = subprocess.run(
        [str(venv_bin() / "flwr"), "--version"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0 and "1.41" in completed.stdout


ROOT = Path(__file__).resolve().parents[2]


def _command_names(typer_app: typer.Typer) -> list[str]:
    names = [info.name for info in typer_app.registered_commands]
    groups = [group.name or group.typer_instance.info.name for group in typer_app.registered_groups]
    return [*names, *groups]


def test_top_level_help_lists_every_command_and_shows_examples() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names = _command_names(app)
    assert len(names) == 11 and all(name for name in names)
    for name in names:
        assert f"python -m server {name}" in result.output, name
    assert "Examples" in result.output


def test_help_imports_neither_torch_nor_flwr() -> None:
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['server', '--help']\n"
        "try:\n"
        "    runpy.run_module('server', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'flwr', 'mlflow'}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert completed.stdout.splitlines()[-1] == "[]", completed.stdout


class _StopBeforeStartingError(Exception):
    """Raised in place of creating the demo's coordinator: the options were read."""


def test_demo_still_takes_out_and_sites_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.commands import demo as demo_module

    def stop(home: Path) -> None:
        raise _StopBeforeStartingError(home)

    monkeypatch.setattr(demo_module, "Coordinator", stop)
    for argv in (
        ["--home", str(tmp_path / "d"), "--num-sites", "2"],
        ["--out", str(tmp_path / "d"), "--sites", "2"],
    ):
        result = runner.invoke(app, ["demo", *argv])
        assert isinstance(result.exception, _StopBeforeStartingError), result.output
        assert result.exception.args[0] == (tmp_path / "d").resolve()
        assert "Demo federation of 2 sites" in result.output
    assert "warning: --out is deprecated, use --home" in result.stderr
    assert "warning: --sites is deprecated, use --num-sites" in result.stderr
    assert "--out" not in runner.invoke(app, ["demo", "--help"]).output


def test_one_poll_interval_default_everywhere() -> None:
    import inspect
    import tomllib

    from server.commands.demo import demo
    from sic_core.cli_vocabulary import POLL_INTERVAL_SECONDS

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"]["poll-interval"] == POLL_INTERVAL_SECONDS
    assert RunSettings.from_run_config({}).poll_interval == POLL_INTERVAL_SECONDS
    assert inspect.signature(demo).parameters["poll_interval"].default == POLL_INTERVAL_SECONDS


def test_user_facing_text_names_the_site_keys_as_keygen_writes_them() -> None:
    import re

    from sic_core.cli_vocabulary import SITE_PUBLIC_KEY_FILE

    texts = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    texts += [*(ROOT / "server").rglob("*.py"), *(ROOT / "client").rglob("*.py")]
    other_names = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in texts
        for name in re.findall(r"[\w-]+\.pub\b", path.read_text())
        if name != SITE_PUBLIC_KEY_FILE and name != "KEY.pub"
    }
    assert not other_names, other_names
