"""``python -m server start``: start the SuperLink and the MLflow tracking server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.audit import actor_here
from server.coordinator import (
    Coordinator,
    CoordinatorAddresses,
    StartSettings,
    start_mlflow,
    start_superlink,
)
from server.processes import ProcessGroup, pid_alive, wait_http_ok
from server.run_watch import reconcile_runs
from server.superlink_listeners import is_loopback
from server.tls import TlsFiles, certificate_names
from sic_core.errors import ConfigError, SicfedError

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


#: The flag of each stored setting (booleans: the flags for on and off), for messages.
_FLAGS: dict[str, str | tuple[str, str]] = {
    "host": "--host",
    "port": "--port",
    "control_port": "--control-port",
    "mlflow_port": "--mlflow-port",
    "insecure": ("--insecure", "--tls"),
    "site_auth": ("--site-auth", "--no-site-auth"),
}


def _as_flag(key: str, value: object) -> str:
    """``--port 8100``, or for a boolean the flag that sets it (``--no-site-auth``)."""
    flag = _FLAGS[key]
    if isinstance(flag, tuple):
        return flag[0] if value else flag[1]
    return f"{flag} {value}"


def _settings_for_this_start(
    coordinator: Coordinator, given: dict[str, object], *, reconfigure: bool
) -> StartSettings:
    """The stored settings with the flags given on top; differing flags need ``reconfigure``.

    Raises
    ------
    ConfigError
        Naming every flag that differs from the stored value (without ``reconfigure``), or
        a bad ``HOME/start.json``.
    """
    requested = {key: value for key, value in given.items() if value is not None}
    stored = coordinator.start_settings()
    if stored is None:
        return StartSettings(**requested)
    changed = {key: value for key, value in requested.items() if getattr(stored, key) != value}
    if changed and not reconfigure:
        differences = ", ".join(
            f"{_as_flag(key, value)} differs from the stored {_as_flag(key, getattr(stored, key))}"
            for key, value in changed.items()
        )
        raise ConfigError(
            f"{coordinator.start_file} holds the settings of the first start; {differences}. "
            f"Leave the flag out to start as before (`python -m server start --home "
            f"{coordinator.home}`), or add --reconfigure to change them"
        )
    return stored.model_copy(update=requested)


def start(
    home: Annotated[Path, typer.Option(help="Coordinator home folder.")] = DEFAULT_HOME,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address the sites' Fleet API listener binds (0.0.0.0: all) (first start: "
            "127.0.0.1)."
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="Fleet API port (the only one sites reach) (first start: 8000)."),
    ] = None,
    control_port: Annotated[
        int | None,
        typer.Option(help="Control/Runtime API port, on 127.0.0.1 only (first start: 8001)."),
    ] = None,
    mlflow_port: Annotated[
        int | None, typer.Option(help="MLflow tracking server port (first start: 5000).")
    ] = None,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure/--tls",
            help="No TLS (loopback experiments only; implies --no-site-auth) (first start: --tls).",
            show_default=False,
        ),
    ] = None,
    site_auth: Annotated[
        bool | None,
        typer.Option(
            "--site-auth/--no-site-auth",
            help="Admit only sites whose key was registered (python -m server register-site) "
            "(first start: --site-auth).",
            show_default=False,
        ),
    ] = None,
    reconfigure: Annotated[
        bool,
        typer.Option(
            "--reconfigure",
            help="Replace the host, ports or security options stored by an earlier start.",
        ),
    ] = False,
) -> None:
    """Start the coordinator: SuperLink (with its state database) and MLflow (sqlite, loopback).

    TLS is required: the certificates come from `python -m server certs` (HOME/tls/).
    Sites reach only the Fleet API (--host/--port); the Control API, which submits and
    stops runs and registers sites, listens on 127.0.0.1:--control-port. Only sites whose
    key was registered may join, unless --no-site-auth. Both services keep running after
    this command returns; stop them with `python -m server stop`. An MLflow server that
    still runs (after `stop --keep-mlflow` or a SuperLink crash) is reused, and runs that
    the previous SuperLink left "running" are marked failed (status.json, MLflow and the
    audit log).

    The first start in a home stores its host, ports and security options in
    HOME/start.json; a later start without those flags reuses them (so a restart after a
    crash comes back where the sites look for it), and a flag that differs from the stored
    value needs --reconfigure.

    Examples
    --------
    python -m server certs --home runs/coordinator --san coordinator.example
    python -m server start --home runs/coordinator --host 0.0.0.0
    python -m server start --home runs/coordinator   # restart: the stored host and ports
    python -m server start --home runs/coordinator --port 8443 --reconfigure
    python -m server start --home /tmp/try --insecure   # loopback experiment, no TLS
    """
    coordinator = Coordinator(home)
    given = {
        "host": host,
        "port": port,
        "control_port": control_port,
        "mlflow_port": mlflow_port,
        "insecure": insecure,
        "site_auth": site_auth,
    }
    try:
        settings = _settings_for_this_start(coordinator, given, reconfigure=reconfigure)
    except SicfedError as error:
        console.print(f"[red]error:[/] {error}", soft_wrap=True)
        raise typer.Exit(2) from None
    host, port = settings.host, settings.port
    control_port, mlflow_port = settings.control_port, settings.mlflow_port
    insecure, site_auth = settings.insecure, settings.site_auth
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
    for line in reconcile_runs(coordinator.home, superlink_alive=False, actor=actor_here()):
        console.print(f"marked {line}", soft_wrap=True)
    site_address = _site_address(host, port, tls)
    coordinator.save_start_settings(settings)
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
