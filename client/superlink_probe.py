"""Check that this site's TLS settings fit the SuperLink before the SuperNode starts.

Flower's SuperNode retries forever, without a hint, when it speaks plain HTTP to a TLS
SuperLink or trusts the wrong CA. ``python -m client join`` probes the SuperLink once with
the same settings and stops with one line naming the cause instead.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from sic_core.errors import SicfedError

__all__ = ["SuperLinkUnreachableError", "TlsMismatchError", "probe_superlink"]

#: OpenSSL's verify code for a certificate that does not name the host asked for.
_HOSTNAME_MISMATCH = 62


class TlsMismatchError(SicfedError):
    """The site's TLS mode or CA does not fit the SuperLink."""

    reason = "tls_mismatch"


class SuperLinkUnreachableError(SicfedError):
    """Nothing answers at the SuperLink's address (yet)."""

    reason = "superlink_unreachable"


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TlsMismatchError(f"--superlink: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        raise SuperLinkUnreachableError(
            f"cannot reach the SuperLink at {host}:{port} ({error})"
        ) from None


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only asks whether a TLS handshake happens at all
    try:
        with context.wrap_socket(_connect(host, port, timeout), server_hostname=host):
            return True
    except (ssl.SSLError, OSError):
        return False


def probe_superlink(address: str, *, root_certificates: Path | None, timeout: float = 10.0) -> None:
    """Connect to the SuperLink's site-facing address the way the SuperNode will.

    Parameters
    ----------
    address
        ``HOST:PORT`` as given to ``join --superlink``.
    root_certificates
        The CA certificate (TLS), or ``None`` for ``--insecure``.
    timeout
        Seconds for each connection attempt.

    Raises
    ------
    TlsMismatchError
        With one line naming the cause: the SuperLink uses TLS but the site is insecure,
        the SuperLink does not use TLS, its certificate is not signed by the given CA, or
        it does not name ``HOST``.
    SuperLinkUnreachableError
        If nothing accepts the connection (the caller may retry).
    """
    host, port = _split(address)
    if root_certificates is None:
        with _connect(host, port, timeout) as connection:
            connection.sendall(f"HEAD /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            try:
                answer = connection.recv(16)
            except OSError:
                answer = b""
        if answer.startswith(b"HTTP/"):
            return
        if _speaks_tls(host, port, timeout):
            raise TlsMismatchError(
                f"the SuperLink at {address} uses TLS but this site joined with --insecure: "
                "give --root-certificates CA.crt (the coordinator's ca.crt) instead"
            )
        raise TlsMismatchError(f"{address} does not answer like a SuperLink (no HTTP reply)")
    try:
        context = ssl.create_default_context(cafile=str(root_certificates))
    except (ssl.SSLError, OSError) as error:
        raise TlsMismatchError(
            f"--root-certificates {root_certificates}: not a PEM CA certificate ({error})"
        ) from None
    try:
        with context.wrap_socket(_connect(host, port, timeout), server_hostname=host):
            return
    except ssl.SSLCertVerificationError as error:
        if error.verify_code == _HOSTNAME_MISMATCH:
            raise TlsMismatchError(
                f"the SuperLink's certificate does not name {host!r}: join with an address "
                "its certificate names (the coordinator's `server certs --san`)"
            ) from None
        raise TlsMismatchError(
            f"the SuperLink's certificate at {address} is not signed by the CA in "
            f"{root_certificates} ({error.verify_message}): get the coordinator's current "
            "ca.crt"
        ) from None
    except ssl.SSLError:
        raise TlsMismatchError(
            f"the SuperLink at {address} does not use TLS (it was started with --insecure): "
            "join with --insecure only if the coordinator says so"
        ) from None
