"""``python -m bench``: run the benchmarks, print a table, write ``bench/results/<device>.json``.

Examples
--------
    python -m bench                      # CPU, writes bench/results/cpu.json
    python -m bench --device cuda        # GPU, writes bench/results/gpu.json
    python -m bench --only training      # one section (its figures replace theirs in
                                         # results/cpu.json; the others stay)
    python -m bench --only site          # one site's message overhead and training on the
                                         # device (--device cuda: on the GPU)
    python -m bench --only cli           # seconds of `python -m server --help` and client's
    python -m bench --only scale         # 10/30/100 simulated sites (minutes; needs the
                                         # [simulation] extra); appends results/scale.json
    python -m bench --only learning      # SIC vs a plain CNN on every preset, 64 and 128 px,
                                         # site_a and pooled, 3 seeds (hours on a CPU);
                                         # merges into results/learning.json (runs of
                                         # the same model/preset/size/regime/seed replaced)
    python -m bench --only learning --sizes 64 --presets easy --regimes site_a --seeds 2
    python -m bench --only learning --presets hard --regimes pooled --models cnn
    python -m bench --only learning --device cuda --sizes 128 --regimes pooled --presets easy
                                         # on a GPU; each run records its device
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import platform
import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("training", "dp", "data", "round", "explain", "cli", "site")
#: Sections run only when named with --only (too slow for `make bench`, or an extra needed);
#: each appends its record to results/<name>.json.
OPTIONAL_SECTIONS = ("scale", "learning")

app = typer.Typer(add_completion=False, help=__doc__, rich_markup_mode=None)
console = Console()


def _machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _run_section(name: str, device: torch.device, workdir: Path) -> dict[str, float]:
    if name == "training":
        from bench.training_bench import run

        size = 128 if device.type == "cuda" else 64
        return run(device, size=size, repeats=10 if device.type == "cuda" else 5)
    if name == "site":
        from bench.site_bench import run as run_site

        return run_site(workdir, device)
    if name == "dp":
        from bench.dp_bench import run as run_dp

        return run_dp(device, size=128 if device.type == "cuda" else 64)
    if name == "explain" and device.type == "cuda":
        from bench.explain_bench import explanations_per_s

        # The share of a round is a deployment figure (sites on CPUs); a GPU gives throughput.
        return {
            "explanations_per_s": explanations_per_s(device, size=128, batch=256),
            "class_explanations_per_s": explanations_per_s(
                device, size=128, batch=256, per_support=False
            ),
        }
    module = importlib.import_module(f"bench.{name}_bench")
    return module.run(workdir)


@app.command()
def main(
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    only: Annotated[
        list[str] | None,
        typer.Option(help=f"sections to run: {SECTIONS}, or one of {OPTIONAL_SECTIONS}"),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="JSON file (default: results/<cpu|gpu>.json)")
    ] = None,
    presets: Annotated[
        list[str] | None, typer.Option(help="learning: presets (default: easy default hard)")
    ] = None,
    sizes: Annotated[
        list[int] | None, typer.Option(help="learning: image sizes (default: 64 128)")
    ] = None,
    regimes: Annotated[
        list[str] | None, typer.Option(help="learning: site_a and/or pooled (default: both)")
    ] = None,
    seeds: Annotated[int, typer.Option(min=1, help="learning: seeds per combination")] = 3,
    models: Annotated[
        list[str] | None,
        typer.Option(help="learning: cnn, bcos_linear and/or sic (default: all three)"),
    ] = None,
) -> None:
    """Run the benchmarks and record their figures."""
    chosen = torch.device(device)
    sections = only or list(SECTIONS)
    unknown = sorted(set(sections) - set(SECTIONS) - set(OPTIONAL_SECTIONS))
    if unknown:
        raise typer.BadParameter(
            f"unknown section(s) {unknown}; expected some of {SECTIONS + OPTIONAL_SECTIONS}"
        )
    if sections == ["learning"]:
        _learning(
            chosen, out, presets=presets, sizes=sizes, regimes=regimes, models=models, seeds=seeds
        )
        return
    figures: dict[str, float] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sicfed-bench-") as workdir:
        for section in sections:
            # One failing section (a federation that dies, say) keeps the others' figures.
            try:
                with console.status(f"benchmark: {section}"):
                    figures.update(_run_section(section, chosen, Path(workdir) / section))
            except Exception as error:  # reported below, and the exit code says so
                console.print(f"[red]section {section} failed:[/] {error}")
                failed[section] = f"{type(error).__name__}: {error}"
    table = Table(title=f"sicfed benchmarks on {chosen}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, f"{value:.3f}")
    console.print(table)
    target = out or RESULTS / ("gpu.json" if chosen.type == "cuda" else "cpu.json")
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(chosen),
        **figures,
        **({"failed_sections": failed} if failed else {}),
    }
    payload: dict | list = record
    if out is None and len(sections) == 1 and sections[0] in OPTIONAL_SECTIONS:
        # An optional section keeps its history: results/<name>.json is a list of records.
        target = RESULTS / f"{sections[0]}.json"
        if sections[0] == "scale":
            from bench.scale_bench import machine_details

            record["machine"] = {**record["machine"], **machine_details()}
        payload = [*(json.loads(target.read_text()) if target.exists() else []), record]
    elif out is None and set(sections) != set(SECTIONS) and target.is_file():
        # Some sections only: their figures replace theirs in results/<device>.json, and
        # the other sections' figures stay (the date and machine are this run's).
        payload = {**json.loads(target.read_text()), **record}
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"written {target}")
    if failed:
        raise typer.Exit(1)


def _learning(
    device: torch.device,
    out: Path | None,
    *,
    presets: list[str] | None,
    sizes: list[int] | None,
    regimes: list[str] | None,
    models: list[str] | None,
    seeds: int,
) -> None:
    from bench import learning_bench

    chosen_presets = presets or list(learning_bench.PRESETS)
    chosen_regimes = regimes or list(learning_bench.REGIMES)
    chosen_models = models or list(learning_bench.MODELS)
    for hint, chosen, allowed in (
        ("--presets", chosen_presets, learning_bench.PRESETS),
        ("--regimes", chosen_regimes, learning_bench.REGIMES),
        ("--models", chosen_models, learning_bench.MODELS),
    ):
        bad = sorted(set(chosen) - set(allowed))
        if bad:
            raise typer.BadParameter(f"unknown {bad}; expected some of {allowed}", param_hint=hint)
    result = learning_bench.run(
        presets=chosen_presets,
        sizes=sizes or [learning_bench.DEMO_SIZE, 128],
        regimes=chosen_regimes,
        models=chosen_models,
        seeds=range(seeds),
        device=device,
    )
    if result["sic_vs_cnn_auroc_ratio"]:  # only when this run trained both at 64 px, site_a
        table = Table(title="SIC vs plain CNN (64 px, site_a; this run's presets)")
        table.add_column("preset")
        table.add_column("best AUROC ratio", justify="right")
        table.add_column("epochs to 0.9 ratio", justify="right")
        for preset, ratio in result["sic_vs_cnn_auroc_ratio"].items():
            epochs_ratio = result["sic_vs_cnn_epochs_to_0p9_ratio"][preset]
            table.add_row(preset, f"{ratio:.3f}", f"{epochs_ratio:.2f}")
        console.print(table)
    target = out or RESULTS / "learning.json"
    previous = json.loads(target.read_text()) if target.is_file() else None
    record = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(device),
        **learning_bench.combine(previous, result),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n")
    console.print(f"written {target}")


if __name__ == "__main__":
    app()
