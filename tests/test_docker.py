"""The site's Docker image, checked without a Docker daemon: what it copies exists and is not
ignored, the build context leaves out the venv, data, runs and history, the base image is a
build argument whose default is an exact release, pip's settings are build arguments, every
package is pinned (and no MLflow), its entrypoint is a real command of the site CLI and the
example in its header runs, the example site config keeps every path under the mount.
(tests/integration/test_site_image.py builds and runs it.)"""

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
from typer.main import get_command
from typer.testing import CliRunner

from client.cli import app
from client.config import load_site_config

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "site.Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SITE_REQUIREMENTS = ROOT / "docker" / "site-requirements.txt"
DOCKER_SITE = ROOT / "site_configs" / "docker_site.yaml"
GUIDE = ROOT / "docs" / "how-to" / "site.md"
#: pip's own settings, build arguments of every stage that runs pip.
PIP_SETTINGS = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_TRUSTED_HOST",
    "PIP_CERT",
)
#: What a site runs: the site CLI and the library (server/ is the coordinator's).
SITE_CODE = ("client", "sic_core")


def _instructions(name: str, text: str | None = None) -> list[str]:
    """Arguments of every ``name`` instruction, continuation lines joined."""
    joined = (DOCKERFILE.read_text() if text is None else text).replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{name} ")]


def _stages() -> list[str]:
    """The Dockerfile's build stages, each from its FROM line on."""
    return re.split(r"^(?=FROM )", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]


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


def _default(argument: str) -> str:
    (default,) = [a.split("=", 1)[1] for a in _instructions("ARG") if a.startswith(f"{argument}=")]
    return default


def test_every_stage_builds_on_the_base_image_argument_an_exact_release_by_default() -> None:
    images = {arguments.split()[0] for arguments in _instructions("FROM")}
    assert images == {"${BASE_IMAGE}"}
    exact = r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?"
    assert re.fullmatch(exact, _default("BASE_IMAGE")), "the default base is a floating tag"


def test_every_stage_takes_pips_settings_as_build_arguments() -> None:
    for stage in _stages():
        assert set(PIP_SETTINGS) <= set(_instructions("ARG", stage)), stage.splitlines()[0]
        # A base with python3 only (no pip, no `python`): each stage makes its own venv.
        assert any("python3 -m venv" in run for run in _instructions("RUN", stage))


def test_torch_is_the_cuda_build_by_default_and_the_cpu_build_on_request() -> None:
    assert _default("TORCH_VARIANT") == "cuda"
    (install,) = [run for run in _instructions("RUN") if "TORCH_VARIANT" in run]
    cuda = install.split("cuda)")[1].split(";;")[0]
    cpu = install.split("cpu)")[1].split(";;")[0]
    assert "-c docker/site-requirements.txt" in cuda and "--index-url" not in cuda
    assert '--index-url "$TORCH_CPU_INDEX_URL"' in cpu and "--no-deps" in cpu
    assert _default("TORCH_CPU_INDEX_URL") == "https://download.pytorch.org/whl/cpu"


def test_torch_pins_match_the_makefile() -> None:
    pins = re.compile(r"torch==[\d.]+ torchvision==[\d.]+")
    makefile = pins.findall((ROOT / "Makefile").read_text())
    assert len(makefile) == 1 and set(pins.findall(DOCKERFILE.read_text())) == set(makefile)


#: pip options whose value follows them (a folder, an index or constraints, not a package).
_PIP_VALUE_OPTIONS = ("--wheel-dir", "--index-url", "-r", "--requirement", "-c", "--constraint")
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
        for command in re.split(r"&&|;;", run)
        if re.search(r"\bpip (install|wheel)\b", command)
    ]
    assert len(commands) == 6, commands
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
            if path.is_relative_to(POSTHOC):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"client", "sic_core", "__future__"}


#: The post-hoc explainers of the black-box twin: the `explainers` extra, not a site's install.
POSTHOC = ROOT / "sic_core" / "posthoc"


def test_the_site_never_imports_the_posthoc_explainers() -> None:
    for path in (ROOT / "client").rglob("*.py"):
        assert "sic_core.posthoc" not in path.read_text(), path


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
    assert "chown -R 10001:10001" in GUIDE.read_text()


def test_entrypoint_runs_the_join_command_of_the_site_cli() -> None:
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert entrypoint == '["python", "-m", "client", "join"]'
    result = CliRunner().invoke(app, ["join", "--help"])
    assert result.exit_code == 0 and "--site" in result.output


def _header() -> str:
    return "\n".join(
        line.removeprefix("#").strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("#")
    )


def test_the_header_example_joins_with_real_options_and_site_authentication() -> None:
    example = _header().replace("\\\n", " ").split("docker run", 1)[1].split("\n")[0]
    _, join_arguments = example.split("sicfed-site:", 1)
    options = set(re.findall(r"(--[a-z-]+)", join_arguments))
    real = _join_options()
    assert options <= real, options - real
    assert {"--site", "--root-certificates", "--auth-key"} <= options
    assert "--read-only" in example and "--restart" in example
    assert "docs/how-to/site.md" in _header() and GUIDE.exists()


def _join_options() -> set[str]:
    command = get_command(app).commands["join"]
    return {option for p in command.params for option in (*p.opts, *p.secondary_opts)}


def test_the_dockerignore_header_names_exactly_what_the_image_copies() -> None:
    header = " ".join(
        line.removeprefix("#")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("#")
    )
    for source in _copied_sources():
        assert source in header, source
    assert "server" not in header.split("copies only")[1].split(":")[0]


def test_the_docker_site_config_keeps_every_path_under_the_mount() -> None:
    config = load_site_config(DOCKER_SITE)
    paths = [config.state_dir, config.data.labels_csv, config.data.root]
    assert all(path is not None and path.is_relative_to("/site") for path in paths), paths
