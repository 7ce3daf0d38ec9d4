"""Write ``docker/site-requirements.txt``: every Python package a site needs, pinned.

The list is the dependency closure of ``[project] dependencies`` in pyproject.toml (what
``pip install '.[site]'`` installs; the coordinator's MLflow is an extra of its own) at the
versions installed in the running environment (the Makefile's ``.venv``, which installs with
this file as its constraints, so both stay in step). Torch's CUDA runtime packages are left
out: torch's CUDA build pins each of them exactly itself, and its CPU build needs none.

Run from the checkout's root after changing a dependency::

    .venv/bin/python docker/pin_site_requirements.py > docker/site-requirements.txt
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

#: Distributions of torch's CUDA build (pinned exactly by torch's own metadata).
CUDA_RUNTIME_PREFIXES = ("nvidia-", "cuda-", "triton")

HEADER = """\
# Every Python package of a sicfed site, pinned (docker/site.Dockerfile installs exactly
# these; the Makefile installs with them as constraints). Generated, do not edit:
#   .venv/bin/python docker/pin_site_requirements.py > docker/site-requirements.txt
"""


def _wanted(requirement: Requirement, extras: frozenset[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({"extra": extra}) for extra in extras or {""})


def site_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """``name==version`` of every package a site needs, sorted by name.

    Parameters
    ----------
    pyproject
        The project file whose ``[project] dependencies`` a site installs.

    Raises
    ------
    importlib.metadata.PackageNotFoundError
        If a needed package is not installed in the running environment.
    """
    declared = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pending = [Requirement(text) for text in declared]
    pinned: dict[str, str] = {}
    # A package is walked again for every new set of extras asked of it (flwr needs
    # sqlalchemy[asyncio] after alembic asked for plain sqlalchemy).
    walked: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        extras = frozenset(requirement.extras)
        if (name, extras) in walked or name.startswith(CUDA_RUNTIME_PREFIXES):
            continue
        walked.add((name, extras))
        distribution = metadata.distribution(name)
        pinned[name] = distribution.version.split("+")[0]
        pending += [
            dependency
            for dependency in map(Requirement, distribution.requires or [])
            if _wanted(dependency, extras)
        ]
    return [f"{name}=={version}" for name, version in sorted(pinned.items())]


if __name__ == "__main__":
    sys.stdout.write(HEADER + "".join(f"{line}\n" for line in site_requirements()))
