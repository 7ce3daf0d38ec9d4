"""The coordinator CLI without a federation: help, argument checks, staging, tables."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
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
