"""The site's Docker image, checked without a Docker daemon: what it copies exists and is not
ignored, the build context leaves out the venv, data, runs and history, the base image is an
exact release, every package is pinned (and no MLflow), its entrypoint is a real command of
the site CLI."""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from client.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "site.Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SITE_REQUIREMENTS = ROOT / "docker" / "site-requirements.txt"
#: What a site runs: the site CLI and the library (server/ is the coordinator's).
SITE_CODE = ("client", "sic_core")


def _instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction, continuation lines joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{name} ")]


def _ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out, for these patterns.

    The subset of Docker's rules the file uses: a pattern matches from the context's root,
    ``**/`` at any depth, and excluding a folder excludes everything under it.
    """
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            tail = pattern.removeprefix("**/")
            candidates = [
                "/".join(parts[i : j + 1]) for i in range(len(parts)) for j in range(i, len(parts))
            ]
            if any(fnmatch.fnmatchcase(c, tail) for c in candidates):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def _copied_sources() -> list[str]:
    sources = []
    for arguments in _instructions("COPY"):
        if arguments.startswith("--from="):
            continue  # from an earlier build stage, not from the checkout
        *paths, _ = arguments.split()
        sources += paths
    return sources


def _pins(text: str) -> dict[str, str]:
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    pins = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.!+-]*)", line)
        assert match, f"not pinned as name==version: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _pinner():
    spec = importlib.util.spec_from_file_location(
        "pin_site_requirements", ROOT / "docker" / "pin_site_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    patterns = _ignore_patterns()
    for source in _copied_sources():
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is copied but .dockerignore drops it"
    for package in SITE_CODE:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            assert not _ignored(relative, patterns), relative


@pytest.mark.parametrize(
    "path",
    [
        ".venv/lib/python3.11/site-packages/torch/__init__.py",
        "demo-out/sites/site_a/site.yaml",
        "runs/coordinator/state.db",
        "mlruns/0/meta.yaml",
        "demo-out/mlflow/mlruns/1/meta.yaml",
        "synth/site_a/images/0001.png",
        ".git/HEAD",
        "site_configs/site_a.yaml",
        "tests/conftest.py",
        "client/__pycache__/app.cpython-311.pyc",
        "ca.key",
    ],
)
def test_the_build_context_leaves_out_venv_data_runs_and_history(path: str) -> None:
    assert _ignored(path, _ignore_patterns()), path


def test_the_matcher_keeps_what_it_should() -> None:
    # client/synth is code (the public probe set), unlike the generated ./synth data.
    assert not _ignored("client/synth/render.py", _ignore_patterns())
    assert _ignored("a/b/mlruns/x", ["**/mlruns"]) and not _ignored("a/mlrunsx", ["**/mlruns"])


def test_the_base_image_is_an_exact_release_in_every_stage() -> None:
    images = {arguments.split()[0] for arguments in _instructions("FROM")}
    assert len(images) == 1, images
    (image,) = images
    exact = r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(exact, image), f"{image} is a floating tag"


def test_torch_pins_match_the_makefile() -> None:
    pins = re.compile(r"torch==[\d.]+ torchvision==[\d.]+")
    assert pins.findall(DOCKERFILE.read_text()) == pins.findall((ROOT / "Makefile").read_text())


#: pip options whose value follows them (a folder or an index, not a package).
_PIP_VALUE_OPTIONS = ("--wheel-dir", "--index-url", "-r", "--requirement")
#: What pip may install that is not a ``name==version`` argument.
_PINNED_SOURCES = {
    "-r docker/site-requirements.txt",  # pinned, checked below
    ".",  # the sicfed wheel, built without its dependencies
    "/wheels/*.whl",  # the same wheel, installed without its dependencies
}


def _pip_arguments(command: str) -> list[str]:
    """What one ``pip install``/``pip wheel`` command installs (flags without values dropped)."""
    tokens = command.split()
    tokens = tokens[tokens.index("pip") + 2 :]
    arguments, skip = [], False
    for i, token in enumerate(tokens):
        if skip:
            skip = False
        elif token in ("-r", "--requirement"):
            arguments.append(f"-r {tokens[i + 1]}")
            skip = True
        elif token in _PIP_VALUE_OPTIONS:
            skip = True
        elif not token.startswith("-"):
            arguments.append(token)
    return arguments


def test_every_pip_install_installs_pinned_packages_only() -> None:
    commands = [
        command
        for run in _instructions("RUN")
        for command in run.split("&&")
        if re.search(r"\bpip (install|wheel)\b", command)
    ]
    assert len(commands) == 5, commands
    for command in commands:
        for argument in _pip_arguments(command):
            assert argument in _PINNED_SOURCES or re.fullmatch(
                r"[A-Za-z0-9._-]+==[0-9][0-9A-Za-z.]*", argument
            ), f"unpinned: {argument} in {command.strip()}"
    without_dependencies = [c for c in commands if "/wheels/*.whl" in c or " ." in c]
    assert all("--no-deps" in c for c in without_dependencies), without_dependencies


def test_site_requirements_are_the_pinned_closure_of_this_environment() -> None:
    pinner = _pinner()
    assert _pins(SITE_REQUIREMENTS.read_text()) == _pins("\n".join(pinner.site_requirements())), (
        "docker/site-requirements.txt is out of date: regenerate it with "
        ".venv/bin/python docker/pin_site_requirements.py > docker/site-requirements.txt"
    )


def test_site_requirements_pin_what_the_environment_has() -> None:
    for name, version in _pins(SITE_REQUIREMENTS.read_text()).items():
        assert metadata.version(name).split("+")[0] == version, name


def _third_party_imports() -> set[str]:
    modules = set()
    for package in SITE_CODE:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"client", "sic_core", "__future__"}


def test_site_code_never_imports_mlflow_and_every_import_is_pinned() -> None:
    imports = _third_party_imports()
    assert "mlflow" not in imports
    distributions = metadata.packages_distributions()
    pins = _pins(SITE_REQUIREMENTS.read_text())
    for module in imports:
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert names & set(pins), f"{module} (from {sorted(names)}) is not pinned for sites"
    assert not {name for name in pins if name.startswith("mlflow")}


def test_the_image_runs_as_uid_and_gid_10001() -> None:
    (run,) = [r for r in _instructions("RUN") if "useradd" in r]
    assert "--gid 10001 site" in run and "--uid 10001 --gid 10001 site" in run
    assert _instructions("USER") == ["site"]
    site_guide = (ROOT / "docs" / "how-to" / "site.md").read_text()
    assert "chown -R 10001:10001" in site_guide


def test_entrypoint_runs_the_join_command_of_the_site_cli() -> None:
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert entrypoint == '["python", "-m", "client", "join"]'
    result = CliRunner().invoke(app, ["join", "--help"])
    assert result.exit_code == 0 and "--site" in result.output
