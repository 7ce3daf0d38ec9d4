"""A lean site install without Docker: ``pip install '.[site]'`` into a fresh virtual
environment brings everything a site needs, at the pinned versions, and no MLflow server.

pip runs with this machine's settings (its local package indexes, where torch and the CUDA
wheels lie, and PyPI for what they lack) and the site pins as constraints, as the hospital's
guide tells a site to install. The fresh site then generates a SynthCXR site and checks it,
which imports the whole data pipeline (torch, MONAI, pydicom).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
SITE_REQUIREMENTS = ROOT / "docker" / "site-requirements.txt"

_DISTRIBUTIONS = (
    "import json, importlib.metadata as m; "
    "print(json.dumps({d.metadata['Name'].lower().replace('_', '-').replace('.', '-'): "
    "d.version for d in m.distributions()}))"
)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        argv, capture_output=True, text=True, check=False, cwd=ROOT, timeout=1500, **kwargs
    )
    assert completed.returncode == 0, f"{argv}\n{completed.stdout}\n{completed.stderr}"
    return completed


def test_the_site_extra_installs_a_working_site_without_mlflow(tmp_path: Path) -> None:
    venv = tmp_path / "site-venv"
    try:
        _check_a_site_install(venv, tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # 6 GB, mostly torch's CUDA wheels


def _check_a_site_install(venv: Path, tmp_path: Path) -> None:
    _run([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    # --no-compile: bytecode of torch's thousands of modules is written when first imported.
    pip = [python, "-m", "pip", "install", "--quiet", "--no-compile"]
    _run([*pip, "-c", str(SITE_REQUIREMENTS), ".[site]"])
    installed = json.loads(_run([python, "-c", _DISTRIBUTIONS]).stdout)
    assert "mlflow" not in installed, "the site extra installed the MLflow server"
    assert "sicfed" in installed
    for line in SITE_REQUIREMENTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert installed.get(name, "").split("+")[0] == version, line

    cli = _run([python, "-m", "client", "--help"])
    assert "check" in cli.stdout and "join" in cli.stdout
    site = tmp_path / "synth"
    _run([python, "-m", "client", "synth", "--out", str(site), "--size", "64", "--scale", "0.05"])
    checked = _run([python, "-m", "client", "check", "--site", str(site / "site_a" / "site.yaml")])
    assert "Site site_a can train." in checked.stdout, checked.stdout
