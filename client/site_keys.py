"""The site's authentication key pair: what Flower's SuperNode signs its requests with.

Flower 1.41 accepts only OpenSSH-format ECDSA keys (a PEM ``EC PRIVATE KEY`` makes the
SuperNode exit with code 302 and no explanation), so the keys are written in exactly the
format ``ssh-keygen -t ecdsa -b 384`` produces, with the ``cryptography`` package.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sic_core.cli_vocabulary import SITE_PRIVATE_KEY_FILE, SITE_PUBLIC_KEY_FILE
from sic_core.errors import ConfigError

__all__ = ["generate_site_keys"]


def generate_site_keys(folder: Path, *, comment: str = "sicfed-site") -> tuple[Path, Path]:
    """Write a new ECDSA P-384 key pair (OpenSSH format) into ``folder``.

    Parameters
    ----------
    folder
        Created if missing. The private key is created with mode 0600.
    comment
        Appended to the public key line (e.g. the site name).

    Returns
    -------
    tuple of Path
        The private key and the public key (``.pub``, for the coordinator).

    Raises
    ------
    ConfigError
        If a key already exists there: a site's key is its identity; replacing it by
        accident would lock the site out until the coordinator registers the new one.
    """
    private_path, public_path = folder / SITE_PRIVATE_KEY_FILE, folder / SITE_PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; remove it first to make a new key")
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(private)
    public_path.write_bytes(public + f" {comment}\n".encode())
    return private_path, public_path
