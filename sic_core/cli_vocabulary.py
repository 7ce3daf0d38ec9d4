"""The words both command lines (``python -m server``, ``python -m client``) use, and the
defaults they share.

One name means one thing in both CLIs:

``--home DIR``
    The coordinator's folder (``server start | run | resume | status | stop | certs |
    register-site | demo | report | audit verify``). A run writes only under it:
    ``HOME/runs/<run id>/`` (``rounds.jsonl``, ``status.json``, ``audit.jsonl``,
    ``reports/``) and ``HOME/checkpoints/<run id>/round_XXX.pt``. ``server run`` sets the
    run config's ``run-dir`` to HOME; commands that read a run take ``--home`` and the run
    id (``report``, ``audit verify``, ``resume``).
``RUN_ID``
    A positional argument naming one run of HOME (default: the newest, or for ``resume``
    the newest that failed).
``--out DIR``
    Always a folder that a command creates or fills (``client synth``, ``client keygen``,
    ``client pretrain``); the files inside have fixed names (:data:`SITE_PRIVATE_KEY_FILE`,
    :data:`SITE_PUBLIC_KEY_FILE`, :data:`WARM_START_FILE`).
``--site FILE``
    A site's YAML config (every ``client`` command but ``synth`` and ``keygen``).
``--port``
    The SuperLink's Fleet API port, the one port sites reach (``server start``). A site's
    own local port is ``client join --local-port``.
``--num-sites N``
    How many sites (``server demo``); ``client synth --sites-config FILE`` is a YAML list
    of site specifications.
``--poll-interval SECONDS``
    Seconds between two requests for work or replies; default
    :data:`POLL_INTERVAL_SECONDS` everywhere (``client join``, ``server demo``, the run
    config's ``poll-interval``).

Old spellings still work for one release, print ``warning: OLD is deprecated, use NEW`` on
standard error, and are hidden from ``--help``: ``server demo --out`` and ``--sites``,
``server report RUN_DIR`` and ``--run-id``, ``server audit verify RUN_DIR``, ``server run
--set run-dir=...``, ``client synth --sites``, ``client join --port`` and ``client pretrain
--out FILE.pt``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "POLL_INTERVAL_SECONDS",
    "SITE_PRIVATE_KEY_FILE",
    "SITE_PUBLIC_KEY_FILE",
    "WARM_START_FILE",
    "deprecated_option",
    "warn_deprecated",
]

#: Seconds between two polls, wherever sicfed chooses the interval: a site's SuperNode asking
#: the SuperLink for work (``client join --poll-interval``, replacing Flower's fixed 3 s) and
#: the ServerApp asking the SuperLink for the sites' replies (run config ``poll-interval``,
#: replacing Flower's 3 s). Each poll is one small request, so a site costs the SuperLink
#: ``1 / POLL_INTERVAL_SECONDS`` requests per second; a message waits at most this long.
POLL_INTERVAL_SECONDS = 0.5

#: The site's key pair in the folder ``client keygen --out`` names: the private key stays at
#: the site (``client join --auth-key``), the public one goes to the coordinator
#: (``server register-site --public-key``).
SITE_PRIVATE_KEY_FILE = "site_ecdsa"
SITE_PUBLIC_KEY_FILE = "site_ecdsa.pub"

#: The checkpoint ``client pretrain --out DIR`` writes into DIR (the run config's
#: ``initial-weights`` then names it).
WARM_START_FILE = "init.pt"

_Value = TypeVar("_Value")


def warn_deprecated(old: str, new: str) -> None:
    """Tell the user on standard error that ``old`` still works but ``new`` replaces it."""
    print(f"warning: {old} is deprecated, use {new}", file=sys.stderr)


def deprecated_option(old: str, new: str) -> Callable[[_Value | None], _Value | None]:
    """A callback for the hidden option ``old``: warns (once per use) when it is given.

    The command then reads the old option's value in place of the new one's, e.g.
    ``home = home if out is None else out``.
    """

    def warn_when_given(value: _Value | None) -> _Value | None:
        if value is not None:
            warn_deprecated(old, new)
        return value

    return warn_when_given
