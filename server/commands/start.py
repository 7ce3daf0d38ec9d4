"""``python -m server start``: start the SuperLink and the MLflow tracking server."""

from __future__ import annotations

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
from server.run_watch import reconcile_runs
from server.superlink_listeners import is_loopback
from server.tls import TlsFiles, certificate_names
from sic_core.errors import SicfedError

__all__ = ["DEFAULT_HOME", "join_command", "start"]

console = Console()

#: Default coordinator home (ignored by git).
DEFAULT_HOME = Path("runs/coordinator")


def join_command(
    address: str,
    *,
    tls: TlsFiles | None,
    site_auth: bool,
) -> str:
    """The command a site runs to join (paths as on the coordinator host: copy ca.crt)."""
    parts = ["python -m client join --site SITE.yaml", f"--superlink {address}"]
    parts.append(f"--root-certificates {tls.ca_cert}" if tls else "--insecure")
    if site_auth:
        parts.append("--auth-key KEYS/site_ecdsa")
    return " ".join(parts)


def _site_address(host: str, port: int, tls: TlsFiles | None) -> str:
    """The address sites use: ``host``, or for a wildcard bind the certificate's first name."""
    if host not in ("0.0.0.0", "::"):
        return f"{host}:{port}"
    names = certificate_names(tls.server_cert) if tls else []
    remote = [name for name in names if not is_loopback(name)]
    return f"{(remote or names or ['127.0.0.1'])[0]}:{port}"


def _running_tracking_uri(coordinator: Coordinator, mlflow_port: int) -> str:
    """The address of the MLflow server that is still running (as the last start saved it)."""
    try:
        return coordinator.addresses().tracking_uri
    except SicfedError:
        return f"http://127.0.0.1:{mlflow_port}"


def start(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    host: Annotated[
        str, typer.Option(help="Address the sites' Fleet API listener binds (0.0.0.0: all).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Fleet API port (the only one sites reach).")] = 8000,
    control_port: Annotated[
        int, typer.Option(help="Control/Runtime API port, on 127.0.0.1 only.")
    ] = 8001,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port.")] = 5000,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="No TLS (loopback experiments only; implies --no-site-auth)."
        ),
    ] = False,
    site_auth: Annotated[
        bool,
        typer.Option(
            "--site-auth/--no-site-auth",
            help="Admit only sites whose key was registered (python -m server register-site).",
        ),
    ] = True,
) -> None:
    """Start the coordinator: SuperLink (with its state database) and MLflow (sqlite, loopback).

    TLS is required: the certificates come from `python -m server certs` (HOME/tls/).
    Sites reach only the Fleet API (--host/--port); the Control API, which submits and
    stops runs and registers sites, listens on 127.0.0.1:--control-port. Only sites whose
    key was registered may join, unless --no-site-auth. Both services keep running after
    this command returns; stop them with `python -m server stop`. An MLflow server that
    still runs (after `stop --keep-mlflow` or a SuperLink crash) is reused, and runs that
    the previous SuperLink left "running" are marked failed (status.json and MLflow).

    Examples
    --------
    python -m server certs --home runs/coordinator --san coordinator.example
    python -m server start --home runs/coordinator --host 0.0.0.0
    python -m server start --home /tmp/try --insecure   # loopback experiment, no TLS
    """
    coordinator = Coordinator(home)
    recorded = coordinator.recorded_processes()
    running = {name for name, info in recorded.items() if pid_alive(int(info["pid"]))}
    if "superlink" in running:
        console.print(
            f"[red]error:[/] {coordinator.home} already runs the SuperLink; stop it first "
            "(`python -m server stop --keep-mlflow` restarts only the SuperLink)"
        )
        raise typer.Exit(1)
    tls = None if insecure else coordinator.tls
    if tls is not None and not tls.complete():
        console.print(
            f"[red]error:[/] no TLS certificates in {tls.folder}: run `python -m server certs "
            f"--home {home} --san HOST` first (or give --insecure, loopback only)"
        )
        raise typer.Exit(2)
    if insecure and not is_loopback(host):
        console.print(f"[red]error:[/] --insecure on {host}, which is not a loopback address")
        raise typer.Exit(2)
    site_auth = site_auth and not insecure
    # A running MLflow (left by `stop --keep-mlflow` or a SuperLink crash) is reused.
    kept_mlflow = {"mlflow": recorded["mlflow"]} if "mlflow" in running else {}
    group = ProcessGroup()
    try:
        if kept_mlflow:
            tracking_uri = _running_tracking_uri(coordinator, mlflow_port)
            mlflow_pid, mlflow_log = kept_mlflow["mlflow"]["pid"], kept_mlflow["mlflow"]["log"]
            console.print(f"MLflow already runs (pid {mlflow_pid}): reusing {tracking_uri}")
        else:
            tracking_uri = start_mlflow(
                group,
                coordinator.mlflow_dir,
                port=mlflow_port,
                log_path=coordinator.logs / "mlflow.log",
            )
            mlflow_pid, mlflow_log = group.processes[0].pid, str(group.processes[0].log_path)
        address, superlink = start_superlink(
            group,
            coordinator,
            port=port,
            host=host,
            control_port=control_port,
            tls=tls,
            site_auth=site_auth,
        )
        with console.status("Waiting for MLflow (first start migrates its database) ..."):
            wait_http_ok(
                f"{tracking_uri}/health",
                timeout=240,
                process=None if kept_mlflow else group.processes[0],
            )
    except (SicfedError, KeyboardInterrupt) as error:
        group.stop_all()
        console.print(f"[red]error:[/] {error}")
        raise typer.Exit(1) from None
    # Runs left "running" by a crash died with the previous SuperLink.
    for line in reconcile_runs(coordinator.home, superlink_alive=False):
        console.print(f"marked {line}", soft_wrap=True)
    site_address = _site_address(host, port, tls)
    coordinator.save_addresses(
        CoordinatorAddresses(superlink=site_address, tracking_uri=tracking_uri)
    )
    group.write_pid_file(coordinator.pid_file, keep=kept_mlflow)
    table = Table(title=f"Coordinator {coordinator.home}")
    for column in ("service", "address", "pid", "log"):
        table.add_column(column)
    table.add_row("SuperLink (sites)", address, str(superlink.pid), str(superlink.log_path))
    table.add_row("Control API", f"127.0.0.1:{control_port}", str(superlink.pid), "")
    table.add_row("MLflow", tracking_uri, str(mlflow_pid), str(mlflow_log))
    console.print(table)
    auth = "on (python -m server register-site admits a site)" if site_auth else "[red]off[/]"
    console.print(f"TLS: {'on' if tls else '[red]off[/]'}; site authentication: {auth}")
    if tls:
        console.print(f"Give every site {tls.ca_cert}.")
    console.print("Sites join with:")
    console.print(join_command(site_address, tls=tls, site_auth=site_auth), soft_wrap=True)
