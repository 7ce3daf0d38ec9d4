"""``python -m server demo``: a whole synthetic federation on this machine.

Generates SynthCXR (if absent), starts the MLflow server (first, its database migration is
slow), a real SuperLink (TLS with the demo's own CA, site authentication on) and one
SuperNode per site on loopback (each with a registered key, approving the demo's bundle),
runs the federation, prints a per-round table and where the reports and the MLflow store
are, and stops every process it started, also on Ctrl-C, SIGTERM and failure. Layout
under ``--home`` (a coordinator folder, as ``python -m server start`` makes)::

    HOME/sites/<site>/       SynthCXR site data, site.yaml, keys/, state/ (cache, reports,
                             FLWR_HOME)
    HOME/tls/                the demo's throw-away CA and SuperLink certificate
    HOME/public/             public SynthCXR (another seed) and init.pt, the public warm
                             start (with --dp or --public-init)
    HOME/mlflow/mlflow.db    MLflow store; artifacts in HOME/mlflow/artifacts
    HOME/checkpoints/<run>/  one atomic checkpoint per round
    HOME/runs/<run>/         rounds.jsonl, status.json, audit.jsonl, reports/
    HOME/logs/               one log per process
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from server.app_bundle import app_bundle_hash
from server.coordinator import (
    Coordinator,
    follow_run,
    free_port,
    round_table,
    start_mlflow,
    start_site,
    start_superlink,
    submit,
)
from server.flower_cli import connected_nodes, register_node
from server.processes import ProcessGroup, ProcessStartError, wait_http_ok
from server.roster import Roster, key_fingerprint, read_public_key
from server.staging import project_root
from server.tls import create_certificates
from sic_core.cli_vocabulary import (
    POLL_INTERVAL_SECONDS,
    SITE_PRIVATE_KEY_FILE,
    SITE_PUBLIC_KEY_FILE,
    WARM_START_FILE,
    deprecated_option,
)
from sic_core.errors import SicfedError

__all__ = [
    "DEMO_SITE_COMMENT",
    "PUBLIC_SEED_OFFSET",
    "PUBLIC_SITES",
    "SITE_NAMES",
    "configure_demo_site",
    "demo",
    "ensure_public_warm_start",
    "ensure_synthcxr",
    "register_demo_site",
    "reset_superlink_state",
    "wait_for_sites",
    "warm_start_stalled",
]

console = Console()

#: SynthCXR's training sites, in order (site_d is held out and never joins).
SITE_NAMES = ("site_a", "site_b", "site_c")
#: Public SynthCXR sites of the warm start: no shortcut marker (site_b has one) and not the
#: held-out site_d's acquisition model.
PUBLIC_SITES = ("site_a", "site_c")
#: The public set's seed is the federation's plus this: other patients, other images.
PUBLIC_SEED_OFFSET = 1000


def ensure_synthcxr(
    folder: Path, *, preset: str, size: int, scale: float, seed: int, log_path: Path
) -> bool:
    """Generate SynthCXR into ``folder`` unless a matching manifest is there.

    Returns True if it generated. Runs ``python -m client synth`` (the coordinator never
    imports site code).
    """
    manifest = folder / "manifest.json"
    if manifest.exists():
        recorded = json.loads(manifest.read_text())
        if (
            recorded.get("size") == size
            and recorded.get("scale") == scale
            and recorded.get("seed") == seed
            and recorded.get("preset", {}).get("name") == preset
        ):
            return False
    argv = [
        sys.executable,
        "-m",
        "client",
        "synth",
        "--out",
        str(folder),
        "--preset",
        preset,
        "--size",
        str(size),
        "--scale",
        str(scale),
        "--seed",
        str(seed),
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as stream:
        completed = subprocess.run(
            argv, stdout=stream, stderr=subprocess.STDOUT, cwd=project_root(), check=False
        )
    if completed.returncode != 0:
        raise ProcessStartError(
            f"SynthCXR generation failed (exit {completed.returncode}); see {log_path}"
        )
    return True


def ensure_public_warm_start(
    folder: Path,
    *,
    preset: str,
    size: int,
    scale: float,
    seed: int,
    epochs: int | None,
    log_path: Path,
) -> tuple[Path, bool]:
    """Public SynthCXR (seed ``seed + PUBLIC_SEED_OFFSET``) and a checkpoint pretrained on it.

    Generates ``folder/synth`` and runs ``python -m client pretrain --out folder`` on its
    :data:`PUBLIC_SITES` (into ``folder/init.pt``), unless a checkpoint made with the same
    settings is there (``folder/init.json``). Returns the checkpoint and whether it was made
    now. No private image is involved: the sites' data come from another seed. ``epochs``
    ``None`` leaves the number to ``pretrain``'s default (the stamp then records ``None``:
    delete ``folder`` after changing that default).
    """
    checkpoint, stamp = folder / WARM_START_FILE, folder / "init.json"
    settings = {
        "preset": preset,
        "size": size,
        "scale": scale,
        "seed": seed + PUBLIC_SEED_OFFSET,
        "sites": list(PUBLIC_SITES),
        "epochs": epochs,
    }
    if checkpoint.exists() and stamp.exists() and json.loads(stamp.read_text()) == settings:
        return checkpoint, False
    ensure_synthcxr(
        folder / "synth",
        preset=preset,
        size=size,
        scale=scale,
        seed=seed + PUBLIC_SEED_OFFSET,
        log_path=log_path,
    )
    argv = [sys.executable, "-m", "client", "pretrain", "--out", str(folder)]
    for name in PUBLIC_SITES:
        argv += ["--site", str(folder / "synth" / name / "site.yaml")]
    argv += ["--seed", str(seed)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    with open(log_path, "ab") as stream:
        completed = subprocess.run(
            argv, stdout=stream, stderr=subprocess.STDOUT, cwd=project_root(), check=False
        )
    if completed.returncode != 0:
        raise ProcessStartError(
            f"public warm start failed (exit {completed.returncode}); see {log_path}"
        )
    stamp.write_text(json.dumps(settings))
    return checkpoint, True


def warm_start_stalled(checkpoint: Path) -> bool:
    """Whether ``python -m client pretrain`` flagged the checkpoint as stalled."""
    from sic_core.checkpoint import load_checkpoint  # torch: only when there is a warm start

    return bool(load_checkpoint(checkpoint).metadata.get("stalled", False))


#: Heads every demo site config: why it shares example images, unlike any real site.
DEMO_SITE_COMMENT = (
    "# A demo site of synthetic SynthCXR data, written by `python -m server demo`.\n"
    "# share_example_images is true here only because no image shows a patient: every\n"
    "# real site keeps the default (false), so that no pixels leave the hospital.\n"
)


def configure_demo_site(site_yaml: Path, *, privacy: dict[str, Any], approved_app: str) -> None:
    """Write the demo's sections into a generated site config.

    ``privacy`` becomes the ``privacy`` section; the site approves exactly the demo's own
    app bundle (``approved_app``, a ``sha256:...`` hash) and shares example images.
    """
    config = yaml.safe_load(site_yaml.read_text())
    config["privacy"] = dict(privacy)
    config["reporting"] = {**(config.get("reporting") or {}), "share_example_images": True}
    config["federation"] = {"approved_apps": [approved_app]}
    site_yaml.write_text(DEMO_SITE_COMMENT + yaml.safe_dump(config, sort_keys=False))


def register_demo_site(coordinator: Coordinator, name: str, keys: Path) -> Path:
    """Give a demo site a key pair (``python -m client keygen``) and register it.

    Returns the site's private key. Keys are made once and reused; a key that the
    coordinator's roster already holds is not registered again.
    """
    private, public = keys / SITE_PRIVATE_KEY_FILE, keys / SITE_PUBLIC_KEY_FILE
    if not private.exists():
        argv = [sys.executable, "-m", "client", "keygen", "--out", str(keys), "--comment", name]
        completed = subprocess.run(
            argv, capture_output=True, text=True, cwd=project_root(), check=False
        )
        if completed.returncode != 0:
            raise ProcessStartError(f"keygen for {name} failed: {completed.stdout.strip()}")
    roster = Roster(coordinator.roster_file)
    fingerprint = key_fingerprint(read_public_key(public))
    if all(site.fingerprint != fingerprint for site in roster.sites()):
        roster.check_new(name, fingerprint)
        roster.add(name, fingerprint, register_node(public, coordinator.flwr_home))
    return private


def reset_superlink_state(coordinator: Coordinator) -> None:
    """Forget the previous demo's SuperLink state and registrations.

    A SuperNode that a previous demo left "online" in the state database could not
    reconnect for a minute (Flower activates only offline nodes); a fresh state and roster
    avoid that wait.
    """
    for path in (coordinator.superlink_db, coordinator.roster_file):
        path.unlink(missing_ok=True)


def wait_for_sites(
    coordinator: Coordinator, count: int, *, timeout: float, group: ProcessGroup
) -> float:
    """Wait until ``count`` SuperNodes are online; return the seconds it took."""
    started = time.monotonic()
    while True:
        group.check_alive()
        try:
            online = len(connected_nodes(coordinator.flwr_home))
        except SicfedError:
            online = 0
        if online >= count:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise ProcessStartError(f"only {online} of {count} sites connected in {timeout:.0f} s")
        time.sleep(1.0)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def demo(
    num_sites: Annotated[
        int, typer.Option(min=1, max=3, help="Number of sites (SynthCXR A, B, C).")
    ] = 3,
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 5,
    size: Annotated[int, typer.Option(help="Image side in pixels (64 or 128).")] = 64,
    scale: Annotated[float, typer.Option(min=0.01, help="SynthCXR size multiplier.")] = 1.0,
    preset: Annotated[str, typer.Option(help="SynthCXR preset: easy, default or hard.")] = "easy",
    home: Annotated[
        Path, typer.Option(help="The demo's coordinator folder (data, runs, MLflow, logs).")
    ] = Path("demo-out"),
    dp: Annotated[bool, typer.Option("--dp", help="Train with DP-SGD at every site.")] = False,
    epsilon_per_round: Annotated[
        float,
        typer.Option(min=0.01, help="Each site's privacy.epsilon_per_round (with --dp)."),
    ] = 2.0,
    public_init: Annotated[
        bool | None,
        typer.Option(
            "--public-init/--no-public-init",
            help="Start from a model pretrained on PUBLIC SynthCXR (another seed); "
            "default: on with --dp, off without.",
        ),
    ] = None,
    public_epochs: Annotated[
        int | None,
        typer.Option(
            min=1, help="Epochs of the public warm start (default: `python -m client pretrain`'s)."
        ),
    ] = None,
    local_epochs: Annotated[int, typer.Option(min=1, help="Local epochs per round.")] = 2,
    seed: Annotated[int, typer.Option(min=0, help="Seed of data and federation.")] = 0,
    poll_interval: Annotated[
        float,
        typer.Option(
            min=0.05,
            help="Seconds between the sites' requests for work and the ServerApp's for replies.",
        ),
    ] = POLL_INTERVAL_SECONDS,
    timeout: Annotated[float, typer.Option(help="Seconds before the demo gives up.")] = 1800.0,
    out: Annotated[
        Path | None,
        typer.Option(hidden=True, callback=deprecated_option("--out", "--home")),
    ] = None,
    sites: Annotated[
        int | None,
        typer.Option(
            min=1, max=3, hidden=True, callback=deprecated_option("--sites", "--num-sites")
        ),
    ] = None,
) -> None:
    """Run a synthetic multi-site federation end to end on this machine.

    Examples
    --------
    python -m server demo
    python -m server demo --dp            # DP-SGD, from a public warm start
    python -m server demo --public-init   # no DP, the same warm start (to compare)
    python -m server demo --num-sites 2 --rounds 5 --size 128 --scale 1.0 --home /tmp/demo
    python -m server report --home demo-out   # rebuild the newest run's reports from MLflow
    """
    if size not in (64, 128):
        raise typer.BadParameter("choose 64 or 128", param_hint="--size")
    home = (home if out is None else out).resolve()
    num_sites = num_sites if sites is None else sites
    console.print(
        f"Demo federation of {num_sites} sites, {rounds} rounds, in {home}", soft_wrap=True
    )
    warm = dp if public_init is None else public_init
    coordinator = Coordinator(home)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    names = SITE_NAMES[:num_sites]
    try:
        with ProcessGroup() as group:
            mlflow_port = free_port(5000)
            tracking_uri = start_mlflow(
                group,
                coordinator.mlflow_dir,
                port=mlflow_port,
                log_path=coordinator.logs / "mlflow.log",
            )
            mlflow = group.processes[-1]
            with console.status("Generating SynthCXR (if absent) ..."):
                generated = ensure_synthcxr(
                    home / "sites",
                    preset=preset,
                    size=size,
                    scale=scale,
                    seed=seed,
                    log_path=coordinator.logs / "synth.log",
                )
            console.print(
                f"SynthCXR in {home / 'sites'} ({'generated' if generated else 'reused'})"
            )
            # TLS with the demo's own throw-away CA, and only registered sites may join.
            if not coordinator.tls.complete():
                create_certificates(coordinator.tls.folder, ["127.0.0.1"], overwrite=True)
            reset_superlink_state(coordinator)
            approved_app = app_bundle_hash(home / "staging")
            for name in names:
                configure_demo_site(
                    home / "sites" / name / "site.yaml",
                    privacy={"epsilon_per_round": epsilon_per_round},
                    approved_app=approved_app,
                )
            address, _ = start_superlink(
                group, coordinator, port=free_port(8000), tls=coordinator.tls, site_auth=True
            )
            for index, name in enumerate(names):
                auth_key = register_demo_site(coordinator, name, home / "sites" / name / "keys")
                start_site(
                    group,
                    home / "sites" / name / "site.yaml",
                    name=name,
                    superlink=address,
                    port=free_port(9094 + index),
                    log_path=coordinator.logs / f"{name}.log",
                    poll_interval=poll_interval,
                    threads=1,
                    root_certificates=coordinator.tls.ca_cert,
                    auth_key=auth_key,
                )
            init_weights = ""
            if warm:
                with console.status("Public warm start (public SynthCXR, another seed) ..."):
                    checkpoint, made = ensure_public_warm_start(
                        home / "public",
                        preset=preset,
                        size=size,
                        scale=scale,
                        seed=seed,
                        epochs=public_epochs,
                        log_path=coordinator.logs / "public.log",
                    )
                init_weights = str(checkpoint)
                console.print(
                    f"Public warm start: {checkpoint} ({'trained' if made else 'reused'})"
                )
                if warm_start_stalled(checkpoint):
                    console.print(
                        "[yellow]warning:[/yellow] the public warm start never left its initial "
                        "plateau (it separates nothing); raise --public-epochs"
                    )
            with console.status(
                f"Waiting for {num_sites} sites (they load and cache their data) ..."
            ):
                waited = wait_for_sites(coordinator, num_sites, timeout=600, group=group)
            console.print(f"{num_sites} sites connected after {waited:.0f} s")
            with console.status("Waiting for MLflow ..."):
                wait_http_ok(f"{tracking_uri}/health", timeout=240, process=mlflow)
            overrides: dict[str, Any] = {
                "rounds": rounds,
                "local-epochs": local_epochs,
                # Trained from scratch, every demo round trains against the public class
                # anchors: switching to episodic supports before the encoder separates the
                # classes collapses it to equal logits.
                "anchor-rounds": rounds,
                "image-size": size,
                "min-sites": num_sites,
                "seed": seed,
                "dp": dp,
                "initial-weights": init_weights,
                "tracking-uri": tracking_uri,
                "study": "demo",
                "poll-interval": poll_interval,
            }
            run_id = submit(coordinator, overrides, staging_parent=home / "staging")
            console.print(f"Federation run {run_id} started; MLflow at {tracking_uri}")

            def show(entry: dict[str, Any]) -> None:
                console.print(round_table([entry], title=f"round {entry['round']}/{rounds}"))

            outcome = follow_run(
                coordinator,
                run_id,
                run_dir=home,
                on_round=show,
                timeout=timeout,
                check=group.check_alive,
            )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process the demo started has been stopped")
        raise typer.Exit(130) from None
    except SicfedError as error:
        console.print(f"[red]demo failed:[/] {error}")
        console.print(f"logs: {coordinator.logs}")
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    console.print(round_table(outcome.rounds, title=f"Federation run {run_id}: {outcome.status}"))
    console.print(f"site reports:      {home / 'sites'}/<site>/state/reports/round_XXX/report.html")
    reports = home / "runs" / str(run_id) / "reports"
    console.print(f"server's copies:   {reports}/round_XXX/<site>/report.html")
    console.print(f"federation summary: {reports / 'federation_summary.html'}")
    console.print(f"checkpoints:       {home / 'checkpoints' / str(run_id)}")
    console.print(
        "MLflow UI:         "
        f"{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
        f"sqlite:///{home / 'mlflow' / 'mlflow.db'} --artifacts-destination "
        f"{home / 'mlflow' / 'artifacts'} --port 5000   (then open http://127.0.0.1:5000)"
    )
    if outcome.status != "completed":
        raise typer.Exit(1)
