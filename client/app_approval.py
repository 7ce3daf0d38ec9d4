"""The site's app approval: a ClientApp runs only if the site approved its bundle's hash.

Flower installs and imports whatever app bundle (FAB) the SuperLink sends. This module is
the site's own gate in front of that: ``python -m client join`` loads it into every
``flwr-clientapp`` process (the warm launcher's forks and cold starts alike) *before* the
process installs the bundle, from the site's checkout and never from the bundle. A bundle
whose SHA-256 is not in ``federation.approved_apps`` is not installed and none of its code is
imported; the process answers the message with the fixed reason ``app_not_approved`` and logs
one line at the site.

The file imports only the standard library and Flower: the ClientApp processes load it by
path, so that no module of the site's checkout named ``client``, ``server``
or ``sic_core`` is ever preloaded in place of the bundle's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

__all__ = [
    "ALLOW_ANY",
    "APPROVED_APPS_ENV",
    "APP_HASH_PATTERN",
    "APP_NOT_APPROVED",
    "SITE_NAME_ENV",
    "app_hash",
    "install_guard",
    "install_guard_from_environment",
]

log = logging.getLogger("sicfed.app_approval")

#: The reason code a site sends for a bundle it did not approve.
APP_NOT_APPROVED = "app_not_approved"
#: How an approved app is written: ``sha256:`` and the bundle's 64 lowercase hex digits.
APP_HASH_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
#: Environment of the ClientApp processes: space-separated approved hashes ...
APPROVED_APPS_ENV = "SICFED_APPROVED_APPS"
#: ... or this value, for ``join --allow-any-app``.
ALLOW_ANY = "*"
#: The site's name, for the reply (``app_not_approved@<site>``).
SITE_NAME_ENV = "SICFED_SITE_NAME"


def app_hash(bundle: bytes) -> str:
    """``sha256:<hex>`` of a FAB's bytes (what ``python -m server app-hash`` prints)."""
    return f"sha256:{hashlib.sha256(bundle).hexdigest()}"


class _Refusal:
    """Stands in for the ClientApp of an unapproved bundle: answers with the reason code."""

    def __init__(self, site: str) -> None:
        self.site = site

    def __call__(self, message: Any, context: Any) -> Any:
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        reason = f"{APP_NOT_APPROVED}@{self.site}" if self.site else APP_NOT_APPROVED
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
        )


def install_guard(approved: frozenset[str] | None, *, site: str) -> None:
    """Gate this ``flwr-clientapp`` process: install and load only approved bundles.

    Parameters
    ----------
    approved
        Approved ``sha256:...`` hashes; ``None`` approves every bundle (``--allow-any-app``).
    site
        The site's name, sent with the refusal.
    """
    from flwr.supernode.runtime import run_clientapp as runtime

    install_from_fab = runtime.install_from_fab
    get_load_client_app_fn = runtime.get_load_client_app_fn
    refused: list[str] = []

    def guarded_install(fab_file: bytes, *args: Any, **kwargs: Any) -> Any:
        digest = app_hash(fab_file)
        if approved is not None and digest not in approved:
            refused.append(digest)
            log.error(
                "%s: refused app %s (not in federation.approved_apps of site %s); nothing of "
                "it was installed or run",
                APP_NOT_APPROVED,
                digest,
                site,
            )
            return None
        return install_from_fab(fab_file, *args, **kwargs)

    def guarded_loader(*args: Any, **kwargs: Any) -> Any:
        load = get_load_client_app_fn(*args, **kwargs)

        def load_if_approved(*load_args: Any, **load_kwargs: Any) -> Any:
            return _Refusal(site) if refused else load(*load_args, **load_kwargs)

        return load_if_approved

    runtime.install_from_fab = guarded_install
    runtime.get_load_client_app_fn = guarded_loader


def install_guard_from_environment() -> None:
    """:func:`install_guard` with the settings ``join`` put into the environment.

    No setting at all approves nothing: a process started without ``join``'s environment
    refuses every bundle rather than running it.
    """
    value = os.environ.get(APPROVED_APPS_ENV, "").strip()
    approved = None if value == ALLOW_ANY else frozenset(value.split())
    install_guard(approved, site=os.environ.get(SITE_NAME_ENV, ""))
