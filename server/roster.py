"""The coordinator's roster of registered sites (``HOME/sites.json``).

``python -m server register-site`` registers a site's public key with the SuperLink through
the loopback Control API and records here who the key belongs to: the site's name, the key's
fingerprint (as ``ssh-keygen -lf`` prints it), the registration time and the node id Flower
gave it. ``server status`` uses it to name the connected sites.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from sic_core.errors import ConfigError
from sic_core.wire import SITE_NAME_PATTERN

__all__ = ["RegisteredSite", "Roster", "key_fingerprint", "read_public_key"]


def read_public_key(path: Path) -> bytes:
    """The OpenSSH ECDSA public key in ``path`` (what ``client keygen`` writes).

    Raises
    ------
    ConfigError
        Naming the file, if it cannot be read or holds no OpenSSH ECDSA public key.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the public key ({error.strerror})") from None
    try:
        key = load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise ConfigError(f"{path}: not an OpenSSH public key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(
            f"{path}: Flower authenticates sites with ECDSA keys only; make one with "
            "`python -m client keygen`"
        )
    return data


def key_fingerprint(public_key: bytes) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key line (``ssh-keygen -lf``'s format)."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class RegisteredSite:
    """One roster entry."""

    name: str
    fingerprint: str
    registered_at: str
    node_id: int


class Roster:
    """The registered sites of one coordinator home."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def sites(self) -> list[RegisteredSite]:
        """Every registered site, in registration order (empty if none)."""
        if not self.path.exists():
            return []
        try:
            return [RegisteredSite(**entry) for entry in json.loads(self.path.read_text())]
        except (json.JSONDecodeError, TypeError) as error:
            raise ConfigError(f"{self.path}: not a sicfed roster ({error})") from None

    def check_new(self, name: str, fingerprint: str) -> None:
        """Raise ``ConfigError`` if the name is malformed or the name or key is taken."""
        if SITE_NAME_PATTERN.fullmatch(name) is None:
            raise ConfigError(
                f"--name {name!r}: letters, digits, '_' and '-' only (the site's pseudonym)"
            )
        for site in self.sites():
            if site.name == name:
                raise ConfigError(f"a site named {name!r} is already registered ({self.path})")
            if site.fingerprint == fingerprint:
                raise ConfigError(f"this key is already registered as site {site.name!r}")

    def add(self, name: str, fingerprint: str, node_id: int) -> RegisteredSite:
        """Record a registration (written atomically)."""
        site = RegisteredSite(
            name=name,
            fingerprint=fingerprint,
            registered_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            node_id=node_id,
        )
        entries = [asdict(entry) for entry in self.sites()] + [asdict(site)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staged = self.path.with_name(f".{self.path.name}.tmp")
        staged.write_text(json.dumps(entries, indent=2))
        os.replace(staged, self.path)
        return site

    def names_by_node(self) -> dict[int, str]:
        """``node id -> site name``."""
        return {site.node_id: site.name for site in self.sites()}
