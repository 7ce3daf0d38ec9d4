"""Imports: sic_core never imports client/ or server/, nor they each other; errors load fast."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"sic_core": {"client", "server"}, "client": {"server"}, "server": {"client"}}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    if package == "sic_core":
        assert files, "sic_core must exist"
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imported_packages(path) & FORBIDDEN[package]
    ]
    assert not violations, violations


def test_sic_core_depends_only_on_torch_numpy_sklearn_and_bcos() -> None:
    allowed = {"torch", "numpy", "sklearn", "bcos", "tqdm", "sic_core", "__future__"}
    # The post-hoc comparison explains the black-box twin with the libraries hospitals use.
    posthoc = allowed | {"captum", "pytorch_grad_cam", "skimage"}
    standard = set(sys.stdlib_module_names)
    offenders = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "sic_core").rglob("*.py")
        for name in _imported_packages(path)
        if name not in (posthoc if "posthoc" in path.parts else allowed) and name not in standard
    }
    assert not offenders, offenders


def test_errors_import_without_torch() -> None:
    """CLIs import the error types first; that must not pay for torch (seconds per call)."""
    import subprocess

    probe = "import sys, sic_core.errors, sic_core; print('torch' in sys.modules)"
    output = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "False"
