"""``python -m server start``: start the SuperLink and the MLflow tracking server."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.coordinator import (
    Coordinator,
    CoordinatorAddresses,
    start_mlflow,
    start_superlink,
)
from server.processes import ProcessGroup, pid_alive, wait_http_ok
from sic_core.errors import SicfedError

__all__ = ["DEFAULT_HOME", "start"]

console = Console()

#: Default coordinator home (ignored by git).
DEFAULT_HOME = Path("runs/coordinator")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    host: Annotated[str, typer.Option(help="SuperLink address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink port (Fleet, Control, Runtime).")] = 8000,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port.")] = 5000,
    ssl_ca_certfile: Annotated[
        Path | None, typer.Option(exists=True, help="TLS CA certificate.")
    ] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(exists=True, help="TLS certificate.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(exists=True, help="TLS private key.")] = None,
    allow_insecure: Annotated[
        bool, typer.Option(help="Allow a non-loopback SuperLink without TLS (never in production).")
    ] = False,
) -> None:
    """Start the coordinator: SuperLink (with its state database) and MLflow (sqlite, loopback).

    Both keep running after this command returns; stop them with `python -m server stop`.

    Examples
    --------
    python -m server start --home runs/coordinator
    python -m server start --host 0.0.0.0 --ssl-ca-certfile ca.crt \
        --ssl-certfile server.pem --ssl-keyfile server.key
    """
    coordinator = Coordinator(home)
    running = [n for n, p in coordinator.recorded_processes().items() if pid_alive(p["pid"])]
    if running:
        console.print(
            f"[red]error:[/] {coordinator.home} already runs {', '.join(running)}; stop it first"
        )
        raise typer.Exit(1)
    tls_files = (ssl_ca_certfile, ssl_certfile, ssl_keyfile)
    if any(tls_files) and not all(tls_files):
        raise typer.BadParameter("TLS needs --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile")
    tls = tls_files if all(tls_files) else None
    if tls is None and not _is_loopback(host) and not allow_insecure:
        raise typer.BadParameter(
            f"{host} is not a loopback address: give TLS files (or --allow-insecure)",
            param_hint="--host",
        )
    group = ProcessGroup()
    try:
        tracking_uri = start_mlflow(
            group,
            coordinator.mlflow_dir,
            port=mlflow_port,
            log_path=coordinator.logs / "mlflow.log",
        )
        address, _ = start_superlink(group, coordinator, port=port, host=host, tls=tls)
        with console.status("Waiting for MLflow (first start migrates its database) ..."):
            wait_http_ok(f"{tracking_uri}/health", timeout=240, process=group.processes[0])
    except (SicfedError, KeyboardInterrupt) as error:
        group.stop_all()
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    coordinator.save_addresses(CoordinatorAddresses(superlink=address, tracking_uri=tracking_uri))
    group.write_pid_file(coordinator.pid_file)
    table = Table(title=f"Coordinator {coordinator.home}")
    for column in ("service", "address", "pid", "log"):
        table.add_column(column)
    table.add_row(
        "SuperLink", address, str(group.processes[1].pid), str(group.processes[1].log_path)
    )
    table.add_row(
        "MLflow", tracking_uri, str(group.processes[0].pid), str(group.processes[0].log_path)
    )
    console.print(table)
    console.print(f"Sites join with: python -m client join --site SITE.yaml --superlink {address}")
