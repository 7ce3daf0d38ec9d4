"""Scale: per-site memory and round time for 10, 30 and 100 simulated sites.

Not part of ``make bench`` (it took 16 minutes on 2 shared cores and needs the
``[simulation]`` extra)::

    .venv/bin/pip install -e '.[simulation]'
    OMP_NUM_THREADS=1 .venv/bin/python -m bench --only scale   # appends bench/results/scale.json

What runs
---------
Flower's simulation engine (``flwr.simulation.run_simulation``, Ray backend) with the real
ServerApp ``main`` (:func:`server.app.main`) and the real ClientApp (:data:`client.app.app`,
its ``sanitise_errors`` mod included). Three SynthCXR sites are generated at 32 px with 32
images each; N site YAMLs (``sim_000`` ... ) are derived from them round-robin, each with its
own name and state folder (its own data cache, report folder and ledger) and an audit set of
8 images. Every N runs 2 rounds (train, support, evaluate with the explanation audit and
report), 1 local epoch, batch 16, no MLflow, with a pool of 2 Ray actors of 1 CPU each (the
machine's 2 cores; ``OMP_NUM_THREADS=1``), each run in its own process.

Which site a virtual node is
----------------------------
Flower 1.41's simulation engine gives a virtual node no node config of its own: it sets only
``partition-id`` and ``num-partitions`` (``flwr.server.superlink.fleet.vce.vce_api``; neither
``run_simulation`` nor ``--federation-config`` takes per-node settings). The ClientApp reads
its site from ``node_config["site-config"]``, so :func:`simulation_client_app` wraps the real
ClientApp and sets that key from the partition id before every message: partition *i* is the
*i*-th site YAML in sorted order (:func:`site_for_partition`, which refuses a
``num-partitions`` that differs from the number of YAMLs).

Figures (per N)
---------------
- ``scale_<N>_round_s``: median wall time of the rounds after the first (the ServerApp's
  round log: train, support and evaluate of all N sites, the server's validation,
  aggregation, reports and checkpoint). ``scale_<N>_first_round_s`` is the first round,
  which also starts Ray and the actors (each imports torch, MONAI and Flower).
- ``scale_<N>_site_rss_mb``: the largest peak RSS of one Ray actor (``ray::ClientAppActor``).
  An actor runs the ClientApp for one site at a time, for all the sites sent to it.
- ``scale_<N>_total_rss_mb``: the peak, over time, of the summed RSS of the whole process
  tree (driver with the ServerApp, Ray's GCS, raylet and agents, idle workers, actors).
  Shared pages (torch's libraries) count once per process, so this overstates the memory
  used; ``scale_<N>_total_pss_mb`` counts them once.
- ``scale_<N>_concurrent_sites``: most actors seen running a ClientApp at the same time.
- ``scale_<N>_site_compute_s``: the summed handler time of all sites in a round (what the
  actors had to do; divided by the pool size it is the round's floor).
- ``scale_<N>_rounds_done``: rounds finished (fewer than 2 only if a run failed or timed out);
  ``scale_<N>_wall_s``: the whole run, process start to exit.
- ``scale_load_avg_1m``: the machine's load average when the benchmark started (the CPUs
  are shared; a high load stretches every time above).

Measured
--------
2026-12-01, 2 CPU cores shared with other engineers' work (load average 8.6 at the start,
up to 12 during the run), 2 actors; flwr 1.41.0, ray 2.55.1, torch 2.14.1 (CPU), Python
3.11.7; ``bench/results/scale.json``. The whole section took 16 minutes (107 s, 253 s and
589 s per size).

=====  =========  ===========  ============  ==========  =========  =========  ==========
sites  round (s)  first round  site compute  actor peak  total RSS  total PSS  concurrent
                  (s)          / round (s)   RSS (MB)    (MB)       (MB)       sites
=====  =========  ===========  ============  ==========  =========  =========  ==========
10     13.2       50.6         24.2          1143        3918       2579       2
30     62.5       145.3        119.7         1150        3962       2527       2
100    262.1      272.6        501.8         1157        4071       2736       2
=====  =========  ===========  ============  ==========  =========  =========  ==========

- Memory does not grow with the number of sites: the 2 actors are reused for every site
  (1.14 GB at 10 sites, 1.16 GB at 100), and the rest (driver with the ServerApp, Ray's
  processes) is about 1.7 GB. 100 sites fit in 24 GiB many times over; memory is set by the
  number of actors (about 1.2 GB each), not by the number of sites.
- Round time grows linearly: it is the sites' summed handler time divided by the 2 actors
  plus 1.1 s (10 sites), 2.6 s (30) and 11.2 s (100) of Flower and server work (about
  0.1 s per site: messages, validation, per-site reports). In a 3-site trial the evaluate
  phase (explanation audit and report) was about three quarters of a site's time. The
  sites' own time rose from 2.4 s to 5.0 s per site and round from 10 to 100 sites, most
  likely with the machine's load (an actor holds no per-site state); on idle cores expect
  the lower figure.
- Time is the limit: 100 sites x 2 rounds took 10 minutes on 2 loaded cores.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from client.app import SITE_CONFIG_KEY
from client.app import app as sicfed_client_app
from server.app import main as sicfed_main
from server.checkpoint import read_rounds
from sic_core.wire import QueryName

__all__ = [
    "MemoryTrace",
    "derive_sites",
    "figures",
    "run",
    "simulation_client_app",
    "site_for_partition",
    "site_yamls",
]

log = logging.getLogger(__name__)

SIZES = (10, 30, 100)
ROUNDS = 2
ACTORS = 2
IMAGE_SIZE = 32
IMAGES_PER_SITE = 32
AUDIT_SET_SIZE = 8
BASE_SITES = ("site_a", "site_b", "site_c")
#: Seconds a run of N sites may take before it is stopped and reported as far as it got.
TIMEOUT_PER_SITE = 15.0
TIMEOUT_FLOOR = 300.0
#: Seconds between two memory samples.
SAMPLE_INTERVAL = 0.5
#: Ray's shared-memory object store (the messages are small; Ray's default is 30 % of RAM).
OBJECT_STORE_BYTES = 256 * 1024**2

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
ACTOR_TITLE = "ClientAppActor"
#: Ray titles an actor process ``ray::ClientAppActor.run`` while it runs a ClientApp.
BUSY_TITLE = "ClientAppActor.run"
MIB = 1024**2
REPO = Path(__file__).resolve().parents[1]

cli = typer.Typer(add_completion=False, rich_markup_mode=None)


# ------------------------------------------------------------------------- sites (pure helpers)


def derive_sites(
    bases: Sequence[Path], target: Path, count: int, *, audit_set_size: int = AUDIT_SET_SIZE
) -> list[Path]:
    """Write ``count`` site YAMLs that read the base sites' data round-robin.

    Site *i* is ``target/sim_<i>/site.yaml``, named ``sim_<i>``, reading the data of
    ``bases[i % len(bases)]`` (paths made absolute) with its own state folder, redacted
    reports and an audit set of ``audit_set_size`` images.

    Parameters
    ----------
    bases
        Site YAML files (for example SynthCXR's ``site_a/site.yaml``).
    target
        Folder for the derived sites (created).
    count
        Number of sites, at least 1.
    audit_set_size
        ``reporting.audit_set_size`` of every derived site.

    Returns
    -------
    list of Path
        The derived YAML files, in partition order.
    """
    if count < 1 or not bases:
        raise ValueError(f"need at least one base site and one site, got {len(bases)}, {count}")
    configs = [(path, yaml.safe_load(path.read_text())) for path in bases]
    written = []
    width = max(3, len(str(count - 1)))
    for index in range(count):
        source, base = configs[index % len(configs)]
        name = f"sim_{index:0{width}d}"
        folder = target / name
        folder.mkdir(parents=True, exist_ok=True)
        data = dict(base["data"])
        for key in ("labels_csv", "root", "npz"):
            if data.get(key) is not None:
                data[key] = str(_absolute(Path(data[key]), source.parent))
        if data.get("format") == "dicom" and data.get("root") is None:
            data["root"] = str(source.parent.resolve())
        config = {
            **base,
            "name": name,
            "state_dir": str((folder / "state").resolve()),
            "data": data,
            "reporting": {"share_example_images": False, "audit_set_size": audit_set_size},
        }
        path = folder / "site.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        written.append(path)
    return written


def _absolute(path: Path, base: Path) -> Path:
    return (path if path.is_absolute() else base / path).resolve()


def site_yamls(folder: Path) -> list[Path]:
    """The site YAMLs under ``folder`` (``*/site.yaml``) in partition order (sorted)."""
    return sorted(folder.glob("*/site.yaml"))


def site_for_partition(yamls: Sequence[str], node_config: Mapping[str, Any]) -> str:
    """The site YAML of a simulated node: the ``partition-id``-th of ``yamls``.

    Raises
    ------
    ValueError
        When the node config lacks the simulation keys, or ``num-partitions`` differs from
        the number of site YAMLs (every virtual node must be a different site).
    """
    partition = node_config.get(PARTITION_ID)
    partitions = node_config.get(NUM_PARTITIONS)
    if not isinstance(partition, int) or not isinstance(partitions, int):
        raise ValueError(
            f"a simulated node needs integer {PARTITION_ID!r} and {NUM_PARTITIONS!r} in its "
            f"node config, got {dict(node_config)}"
        )
    if partitions != len(yamls):
        raise ValueError(
            f"the simulation has {partitions} virtual nodes but {len(yamls)} site YAMLs; "
            "start it with as many nodes as sites"
        )
    if not 0 <= partition < partitions:
        raise ValueError(f"{PARTITION_ID} {partition} is outside 0..{partitions - 1}")
    return yamls[partition]


# ------------------------------------------------------------------------------ Flower adapters


def simulation_client_app(yamls: Sequence[Path], app: ClientApp = sicfed_client_app) -> ClientApp:
    """A ClientApp that runs ``app`` (default: sicfed's) as the partition's site.

    Sets ``node_config["site-config"]`` from :func:`site_for_partition` before every message
    and hands the message to ``app`` unchanged (its mods included).
    """
    paths = [str(path) for path in yamls]
    wrapper = ClientApp()

    def as_site(message: Message, context: Context) -> Message:
        context.node_config[SITE_CONFIG_KEY] = site_for_partition(paths, context.node_config)
        return app(message, context)

    wrapper.train()(as_site)
    wrapper.evaluate()(as_site)
    wrapper.query(str(QueryName.SUPPORT))(as_site)
    return wrapper


def simulation_server_app(run_config: Mapping[str, Any]) -> ServerApp:
    """A ServerApp that runs sicfed's ``main`` with ``run_config``.

    ``run_simulation`` gives the ServerApp an empty run config (``flwr run`` would send
    pyproject's table); this supplies it.
    """
    wrapper = ServerApp()

    @wrapper.main()
    def _main(grid: Grid, context: Context) -> None:
        sicfed_main(
            grid,
            Context(
                run_id=context.run_id,
                node_id=context.node_id,
                node_config=context.node_config,
                state=context.state,
                run_config=dict(run_config),
            ),
        )

    return wrapper


def run_config(sites: int, run_dir: Path, *, rounds: int = ROUNDS) -> dict[str, Any]:
    """pyproject's run-config defaults with the scale benchmark's settings."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {
        **pyproject["tool"]["flwr"]["app"]["config"],
        "rounds": rounds,
        "image-size": IMAGE_SIZE,
        "local-epochs": 1,
        "batch-size": 16,
        "min-sites": sites,
        "run-dir": str(run_dir),
        "tracking-uri": "",
        "round-timeout": 1800.0,
        "node-wait": 60.0,
    }


def backend_config(actors: int) -> dict[str, Any]:
    """Ray: ``actors`` CPUs, one per actor, a small object store, no dashboard."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": actors,
            "num_gpus": 0,
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": True,
        },
    }


@cli.command()
def simulate(
    sites_dir: Annotated[Path, typer.Option(help="folder of */site.yaml (one per node)")],
    run_dir: Annotated[Path, typer.Option(help="the ServerApp's run-dir")],
    rounds: Annotated[int, typer.Option()] = ROUNDS,
    actors: Annotated[int, typer.Option(help="Ray actors (CPUs)")] = ACTORS,
) -> None:
    """Run one simulated federation of the sites in SITES_DIR (the measured process)."""
    from flwr.simulation import run_simulation

    yamls = site_yamls(sites_dir)
    run_simulation(
        server_app=simulation_server_app(run_config(len(yamls), run_dir, rounds=rounds)),
        client_app=simulation_client_app(yamls),
        num_supernodes=len(yamls),
        backend_config=backend_config(actors),
    )


# ----------------------------------------------------------------------------- measurement


@dataclass
class MemoryTrace:
    """Peaks seen while sampling a process tree.

    Attributes
    ----------
    actor_peak_rss
        Peak RSS (bytes) of each Ray actor process, by pid.
    total_peak_rss, total_peak_pss
        Peak over samples of the tree's summed RSS / PSS (bytes).
    max_busy
        Most actors running a ClientApp in one sample.
    samples
        Number of samples taken.
    """

    actor_peak_rss: dict[int, int] = field(default_factory=dict)
    total_peak_rss: int = 0
    total_peak_pss: int = 0
    max_busy: int = 0
    samples: int = 0

    def add(self, sample: Iterable[tuple[int, str, int, int]]) -> None:
        """Fold one sample in: ``(pid, process title, rss, pss)`` per process of the tree."""
        rss_sum = pss_sum = busy = 0
        for pid, title, rss, pss in sample:
            rss_sum += rss
            pss_sum += pss
            if ACTOR_TITLE in title:
                self.actor_peak_rss[pid] = max(self.actor_peak_rss.get(pid, 0), rss)
                busy += BUSY_TITLE in title
        self.total_peak_rss = max(self.total_peak_rss, rss_sum)
        self.total_peak_pss = max(self.total_peak_pss, pss_sum)
        self.max_busy = max(self.max_busy, busy)
        self.samples += 1


PHASE_SECONDS = {"train": "train.seconds", "support": "support.seconds", "evaluate": "val.seconds"}


def figures(
    sites: int, rounds: Sequence[Mapping[str, Any]], trace: MemoryTrace
) -> dict[str, float]:
    """The ``scale_<sites>_*`` figures of one run from its round log and memory trace.

    Round figures are medians over the rounds after the first (all rounds if only one).
    """
    prefix = f"scale_{sites}"
    measured = rounds[1:] or rounds
    compute = [
        sum(
            float(row["metrics"][key])
            for phase, key in PHASE_SECONDS.items()
            for row in entry["sites"].get(phase, [])
            if row.get("status") == "ok"
        )
        for entry in measured
    ]
    nan = float("nan")
    return {
        f"{prefix}_round_s": statistics.median(e["seconds"] for e in measured) if rounds else nan,
        f"{prefix}_first_round_s": float(rounds[0]["seconds"]) if rounds else nan,
        f"{prefix}_site_rss_mb": max(trace.actor_peak_rss.values(), default=0) / MIB,
        f"{prefix}_total_rss_mb": trace.total_peak_rss / MIB,
        f"{prefix}_total_pss_mb": trace.total_peak_pss / MIB,
        f"{prefix}_concurrent_sites": float(trace.max_busy),
        f"{prefix}_site_compute_s": statistics.median(compute) if compute else nan,
        f"{prefix}_rounds_done": float(len(rounds)),
    }


def _sample(root: Any) -> list[tuple[int, str, int, int]]:
    import psutil

    rows = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            memory = process.memory_full_info()
            title = " ".join(process.cmdline()) or process.name()
            rows.append((process.pid, title, memory.rss, getattr(memory, "pss", memory.rss)))
    return rows


def _stop_tree(process: subprocess.Popen) -> None:
    """Stop the simulation process and every process it started, by pid."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    process.wait()


def measure(
    argv: Sequence[str], log_path: Path, *, timeout: float
) -> tuple[MemoryTrace, int | None]:
    """Run ``argv``, sampling its process tree's memory; return the trace and exit code.

    The exit code is ``None`` when the run was stopped at ``timeout`` seconds.
    """
    import psutil

    trace = MemoryTrace()
    env = {**os.environ, "OMP_NUM_THREADS": "1", **_FLOWER_ENV}
    with open(log_path, "w") as stream:
        process = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(process.pid)
        deadline = time.monotonic() + timeout
        try:
            while process.poll() is None:
                if time.monotonic() > deadline:
                    _stop_tree(process)
                    return trace, None
                trace.add(_sample(root))
                time.sleep(SAMPLE_INTERVAL)
        except BaseException:
            _stop_tree(process)
            raise
    return trace, process.returncode


_FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_DEDUP_LOGS": "0",
}


def base_sites(folder: Path) -> list[Path]:
    """Three SynthCXR sites at 32 px with ``IMAGES_PER_SITE`` images each."""
    from client.synth import generate_synthcxr
    from client.synth.params import default_sites

    specs = [
        spec.model_copy(update={"count": IMAGES_PER_SITE})
        for spec in default_sites()
        if spec.name in BASE_SITES
    ]
    generate_synthcxr(folder, preset="easy", size=IMAGE_SIZE, seed=0, sites=specs, workers=1)
    return [folder / name / "site.yaml" for name in BASE_SITES]


def run_size(
    workdir: Path, bases: Sequence[Path], sites: int, *, actors: int = ACTORS
) -> dict[str, float]:
    """Simulate ``sites`` sites in a fresh process; return its figures."""
    folder = workdir / f"n{sites}"
    derive_sites(bases, folder / "sites", sites)
    run_dir = folder / "runs"
    argv = [
        sys.executable,
        "-m",
        "bench.scale_bench",
        "--sites-dir",
        str(folder / "sites"),
        "--run-dir",
        str(run_dir),
        "--actors",
        str(actors),
    ]
    timeout = TIMEOUT_FLOOR + TIMEOUT_PER_SITE * sites
    started = time.perf_counter()
    trace, code = measure(argv, folder / "simulation.log", timeout=timeout)
    logs = sorted(run_dir.glob("runs/*/rounds.jsonl"))
    rounds = read_rounds(logs[-1]) if logs else []
    result = figures(sites, rounds, trace)
    result[f"scale_{sites}_wall_s"] = time.perf_counter() - started
    if code != 0 or len(rounds) < ROUNDS:
        why = "timed out" if code is None else f"exit code {code}"
        log.warning(
            "%d sites: %s after %d of %d rounds; see %s",
            sites,
            why,
            len(rounds),
            ROUNDS,
            folder / "simulation.log",
        )
    return result


def machine_details() -> dict[str, object]:
    """What the figures depend on beyond ``python -m bench``'s machine record."""
    details: dict[str, object] = {"cpus": os.cpu_count(), "actors": ACTORS}
    for package in ("flwr", "ray", "psutil"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            details[package] = importlib.metadata.version(package)
    return details


def run(workdir: Path, sizes: Sequence[int] = SIZES, *, actors: int = ACTORS) -> dict[str, float]:
    """Measure every size in ``sizes``; the ``scale_<N>_*`` figures of each.

    Needs the ``[simulation]`` extra (Ray and psutil).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    bases = base_sites(workdir / "synth")
    result: dict[str, float] = {"scale_load_avg_1m": os.getloadavg()[0]}
    for sites in sizes:
        result.update(run_size(workdir, bases, sites, actors=actors))
    return result


if __name__ == "__main__":
    cli()
