"""The site's Docker image, checked without a Docker daemon: what it copies exists, it pins the
torch the Makefile pins, and its entrypoint is a real command of the site CLI."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from client.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "site.Dockerfile"


def _instructions(name: str) -> list[str]:
    return [
        line.split(None, 1)[1]
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith(f"{name} ")
    ]


def test_every_copied_path_exists_in_the_checkout() -> None:
    for arguments in _instructions("COPY"):
        *sources, _ = arguments.split()
        for source in sources:
            assert (ROOT / source).exists(), source


def test_torch_pins_match_the_makefile() -> None:
    pins = re.compile(r"torch==[\d.]+ torchvision==[\d.]+")
    assert pins.findall(DOCKERFILE.read_text()) == pins.findall((ROOT / "Makefile").read_text())


def test_entrypoint_runs_the_join_command_of_the_site_cli() -> None:
    (entrypoint,) = _instructions("ENTRYPOINT")
    assert entrypoint == '["python", "-m", "client", "join"]'
    result = CliRunner().invoke(app, ["join", "--help"])
    assert result.exit_code == 0 and "--site" in result.output
