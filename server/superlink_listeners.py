"""Flower's SuperLink on two listeners: a site-facing one for the Fleet API only, and loopback.

Flower 1.41 serves the Fleet API (SuperNodes), the Control API (``flwr run``, ``flwr stop``,
``flwr supernode register``) and the Runtime API (its own ServerApp processes) from one HTTP
server; ``--fleet-api-address`` and ``--control-api-address`` no longer split them, and the
Control API has no authentication. Whoever reaches the port that sites use could submit an
app that then runs at every site. This program runs the SuperLink exactly as
``flower-superlink`` does, with the same arguments, on ``--host``/``--port`` (which must be a
loopback address: the coordinator's Control and Runtime side), and serves the same
application a second time on the site-facing address, where every path but the Fleet API
and ``/health`` is answered with 404. Both listeners share one process, one state and one
TLS certificate.

Run as a script with ``python -I`` (no project module may shadow what Flower imports)::

    python -I server/superlink_listeners.py --site-address 0.0.0.0:8000 -- \\
        --host 127.0.0.1 --port 8001 --ssl-ca-certfile ca.crt --ssl-certfile server.crt \\
        --ssl-keyfile server.key --enable-supernode-auth --database state.db

It imports Flower's own SuperLink start-up functions (private in 1.41, which the project
pins); ``tests/integration/test_security.py`` fails if a Flower upgrade changes them.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["SITE_PATH_PREFIXES", "SiteFacingOnly", "main"]

#: What a site may reach: the Fleet API and the health check. Everything else (``/v1/control``,
#: ``/v1/runtime``, ``/docs``, ...) stays on loopback.
SITE_PATH_PREFIXES = ("/v1/fleet/", "/health")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SiteFacingOnly:
    """ASGI wrapper that passes only :data:`SITE_PATH_PREFIXES` requests to the SuperLink.

    Parameters
    ----------
    app
        The SuperLink's FastAPI application.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or any(
            path == prefix.rstrip("/") or path.startswith(prefix) for prefix in SITE_PATH_PREFIXES
        ):
            await self.app(scope, receive, send)
            return
        body = b"not served on the site-facing address\n"
        await send(
            {
                "type": "http.response.start",
                "status": 404,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--site-address: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(servers: list[Any]) -> None:
    """Serve until one listener stops (a signal reaches only the last one installed)."""

    async def stop_all_when_one_stops() -> None:
        while not any(server.should_exit for server in servers):
            await asyncio.sleep(0.2)
        for server in servers:
            server.should_exit = True

    await asyncio.gather(*(server.serve() for server in servers), stop_all_when_one_stops())


def main(argv: list[str] | None = None) -> None:
    """Start the SuperLink with its site-facing listener (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Flower SuperLink whose Control and Runtime APIs stay on loopback.",
        epilog="Arguments after `--` go to flower-superlink unchanged.",
    )
    parser.add_argument("--site-address", required=True, help="HOST:PORT the sites reach.")
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    ours = parser.parse_args(argv[:split])
    site_host, site_port = _split_address(ours.site_address)

    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    sys.argv = ["flower-superlink", *argv[split + 1 :]]
    config = _parse_superlink_lifespan_config()
    if not is_loopback(config.host):
        raise SystemExit(f"--host {config.host}: the Control API must bind a loopback address")
    app = create_app(config, SuperLinkLifespan)
    log_config = get_uvicorn_log_config(console_handler.level)
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    control = uvicorn.Config(
        app, host=config.host, port=config.port, log_config=log_config, workers=1, **tls
    )
    site = uvicorn.Config(
        SiteFacingOnly(app),
        host=site_host,
        port=site_port,
        lifespan="off",  # the control listener owns the SuperLink's start-up and shutdown
        log_config=log_config,
        **tls,
    )
    asyncio.run(_serve([uvicorn.Server(control), uvicorn.Server(site)]))


if __name__ == "__main__":
    main()
