"""Headless Chromium for the tests that look at rendered reports; the ``gpu`` marker's rule.

In CI (``CI=true``; ``.ci/run`` installs Debian's chromium) a missing browser fails the test;
elsewhere the test is skipped with the reason printed, so ``make test`` passes on a machine
without Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)

#: Appended to a copy of a page: writes what ``measure`` (a JS expression) returns into the
#: DOM, where ``--dump-dom`` reads it back. The pages themselves carry no JavaScript.
_PROBE = (
    "<script>window.addEventListener('load', () => {{ const out = "
    "document.createElement('pre'); out.id = 'layout-probe'; out.textContent = "
    "JSON.stringify(({measure})); document.body.appendChild(out); }});</script>"
)


@dataclass(frozen=True)
class HeadlessChromium:
    """A Chromium binary with the flags and a private profile under a test's folder."""

    binary: str
    profile: Path

    def _run(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        command = [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)

    def dump_dom(self, page: Path, *, width: int = 1400, height: int = 3000) -> str:
        """The DOM of ``page`` after loading it in a window of the given size."""
        return self._run(f"--window-size={width},{height}", "--dump-dom", page.as_uri()).stdout

    def screenshot(self, page: Path, shot: Path, *, width: int = 1400, height: int = 3000) -> Path:
        """A PNG of ``page`` as shown in a window of the given size."""
        self._run(f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri())
        return shot

    def measure(self, page: Path, measure: str, *, width: int = 1400) -> Any:
        """Evaluate the JS expression ``measure`` on a copy of ``page`` laid out ``width`` wide.

        Returns the expression's value, JSON-decoded.
        """
        probed = page.with_name(f"{page.stem}.probe.html")
        probed.write_text(page.read_text() + _PROBE.format(measure=measure))
        dom = self.dump_dom(probed, width=width)
        start = dom.index('<pre id="layout-probe">') + len('<pre id="layout-probe">')
        text = dom[start : dom.index("</pre>", start)]
        return json.loads(text.replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture
def chromium(tmp_path: Path) -> HeadlessChromium:
    """Debian's headless Chromium; mandatory when ``CI=true``, else skipped if missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no chromium on PATH: .ci/run installs Debian's chromium")
        pytest.skip(
            "no chromium on PATH: the report is not checked in a browser here "
            "(apt-get install chromium; mandatory when CI=true)"
        )
    return HeadlessChromium(binary=binary, profile=tmp_path / "chromium-profile")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu``: deselected in CI (no GPU there); skipped, with the reason
    printed, on a machine without a CUDA device; run where one is (``bench/gpu.sh``)."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    if os.environ.get("CI", "").lower() == "true":
        config.hook.pytest_deselected(items=marked)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]
        return
    import torch

    if not torch.cuda.is_available():
        reason = pytest.mark.skip(
            reason=f"no CUDA device here (torch {torch.__version__}): the gpu tests run on a "
            "lent GPU through bench/gpu.sh; CI deselects them"
        )
        for item in marked:
            item.add_marker(reason)
