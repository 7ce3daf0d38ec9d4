"""How long the command lines take to answer ``--help``.

- ``server_help_s``, ``client_help_s``: seconds (median of repeats, warm file cache) of
  ``python -m server --help`` and ``python -m client --help`` in a new process, as a user
  types them; target 2 s on 2 cores. Neither may import torch or flwr (the test suite
  checks which modules load; before that, ``server --help`` took 10 s warm and 52 s cold).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["help_seconds", "run"]

_ROOT = Path(__file__).resolve().parent.parent


def help_seconds(package: str, *, repeats: int) -> float:
    """Median wall time of ``python -m <package> --help`` over ``repeats`` new processes."""
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", package, "--help"],
            cwd=_ROOT,
            capture_output=True,
            check=True,
        )
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def run(workdir: Path, *, repeats: int = 5) -> dict[str, float]:
    """The section's figures (``workdir`` is unused: nothing is written)."""
    return {
        "server_help_s": help_seconds("server", repeats=repeats),
        "client_help_s": help_seconds("client", repeats=repeats),
    }
