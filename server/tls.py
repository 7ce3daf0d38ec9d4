"""The coordinator's TLS material: a private CA and the SuperLink's server certificate.

``python -m server certs`` writes, under ``HOME/tls/``::

    ca.crt       the CA certificate: give it to every site (--root-certificates)
    ca.key       the CA's private key: stays with the coordinator (signs new server certs)
    server.crt   the SuperLink's certificate, signed by the CA, valid for the names given
    server.key   its private key

The server certificate always also names ``127.0.0.1`` and ``localhost``: the coordinator's
own tools and Flower's ServerApp processes reach the SuperLink's Control and Runtime APIs on
loopback, with the same certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sic_core.errors import ConfigError

__all__ = ["LOOPBACK_NAMES", "TlsFiles", "certificate_names", "create_certificates"]

#: Names every server certificate carries (the loopback Control and Runtime listener).
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Where a coordinator home keeps its TLS files."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    def complete(self) -> bool:
        """True if the CA certificate and the server certificate and key exist."""
        return all(p.is_file() for p in (self.ca_cert, self.server_cert, self.server_key))


def _subject_alternative_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as stream:
        stream.write(data)


def create_certificates(
    folder: Path, names: list[str], *, days: int = 825, overwrite: bool = False
) -> TlsFiles:
    """Create a CA and a server certificate for ``names`` (plus :data:`LOOPBACK_NAMES`).

    Parameters
    ----------
    folder
        Where the four files go (created).
    names
        Host names and IP addresses the sites use to reach the SuperLink.
    days
        Validity of both certificates.
    overwrite
        Replace existing files (sites must then get the new ``ca.crt``).

    Raises
    ------
    ConfigError
        If the files exist and ``overwrite`` is false, or a name is empty.
    """
    files = TlsFiles(folder)
    if not overwrite and any(
        p.exists() for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    ):
        raise ConfigError(
            f"{folder} already holds TLS files; give --overwrite to replace them (every site "
            "then needs the new ca.crt)"
        )
    if any(not name.strip() for name in names):
        raise ConfigError("--san: a name must not be empty")
    all_names = list(dict.fromkeys([*names, *LOOPBACK_NAMES]))
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sicfed coordinator CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(
            x509.SubjectAlternativeName([_subject_alternative_name(n) for n in all_names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )

    pem = serialization.Encoding.PEM
    private_format = serialization.PrivateFormat.PKCS8
    no_password = serialization.NoEncryption()
    _write_private(files.ca_key, ca_key.private_bytes(pem, private_format, no_password))
    _write_private(files.server_key, server_key.private_bytes(pem, private_format, no_password))
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    return files


def certificate_names(certificate: Path) -> list[str]:
    """The subject alternative names (DNS names, IP addresses) of a PEM certificate, in order."""
    loaded = x509.load_pem_x509_certificate(certificate.read_bytes())
    try:
        san = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in san]
