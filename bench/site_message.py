"""One message at one site, timed step by step in a process of its own (run by
:mod:`bench.site_bench`; prints one JSON object).

``--launch cold`` is Flower's default: a fresh interpreter that imports the ClientApp, then
reads the site's config and cached data and builds the model. ``--launch warm`` is how
``python -m client join`` runs a ClientApp by default: a launcher that has imported the
heavy libraries (:data:`client.commands.join.WARM_MODULES`) forks a child per message, and
the child imports the project from the app bundle and does the rest; timing starts at the
fork. Either way the child then does the message's work (one round of local training,
support statistics, evaluation, the audit and report) on ``--device``.

Examples
--------
    python -m bench.site_message --site /tmp/s/site_a/site.yaml --launch warm --device cpu
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _synchronise(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Any, device: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = step()
    _synchronise(device)
    return result, time.perf_counter() - started


def message(site_yaml: Path, *, epochs: int, since: float | None) -> dict[str, Any]:
    """Run one message's steps; ``since`` is the fork's ``perf_counter`` (``None``: cold)."""
    started = time.perf_counter()
    import torch
    from flwr.app import ArrayRecord

    import client.app  # noqa: F401  (what a ClientApp process imports first)
    from client.app import process_age
    from client.config import load_site_config
    from client.data import load_site_data
    from client.device import device_label, site_device
    from client.round_report import RoundFacts, audit_and_report
    from client.training import (
        ModelSpec,
        RoundSettings,
        build_model,
        evaluate_locally,
        support_statistics,
        train_locally,
    )
    from sic_core import anchor_support, create_model
    from sic_core.wire import SUPPORT_BUFFER_KEYS

    imports = process_age() if since is None else time.perf_counter() - since
    project_imports = time.perf_counter() - started

    def config_and_device() -> tuple[Any, Any]:
        config = load_site_config(site_yaml)
        return config, site_device(config)

    (config, device), config_s = _timed(config_and_device, torch.device("cpu"))
    # CUDA's context: created once per process; a forked child cannot inherit it.
    _, device_s = _timed(lambda: torch.empty(1, device=device), device)
    data, cache_s = _timed(lambda: load_site_data(config), device)
    size = config.data.image_size
    spec = ModelSpec("bcos_cnn_small", len(config.data.class_names), 3, 128, size)
    torch.manual_seed(0)
    fresh = create_model(spec.encoder, 1, spec.num_classes, n_shot=spec.n_shot)
    arrays = ArrayRecord(
        {k: v for k, v in fresh.state_dict().items() if k not in SUPPORT_BUFFER_KEYS}
    )
    anchors = anchor_support(spec.num_classes, spec.n_shot, spec.proj_dim, seed=0)
    model, model_s = _timed(lambda: build_model(spec, arrays, anchors, device=device), device)
    overhead = imports + config_s + device_s + cache_s + model_s

    train, val = data.split("train"), data.split("val")
    settings = RoundSettings(
        server_round=2, local_epochs=epochs, lr=5e-4, batch_size=32, seed=0, anchor_rounds=1
    )
    history, train_s = _timed(
        lambda: train_locally(model, train.images, train.labels, settings), device
    )
    _, support_s = _timed(
        lambda: support_statistics(model, train.images, train.labels, seed=0), device
    )
    result, evaluate_s = _timed(
        lambda: evaluate_locally(
            model, anchors, train.images, train.labels, val.images, val.labels
        ),
        device,
    )
    facts = RoundFacts(
        run_id="bench",
        server_round=2,
        config_path=site_yaml,
        performance={"perf/auroc": result.auroc},
        reliability=result.reliability,
        dp_epsilon=0.0,
        dp_delta=config.privacy.target_delta,
        released=[],
    )
    _, audit_s = _timed(
        lambda: audit_and_report(config, data, model, anchors, result.local_support.indices, facts),
        device,
    )
    return {
        "device": device_label(device),
        "overhead_s": overhead,
        "imports_s": imports,
        "project_imports_s": project_imports,
        "config_s": config_s,
        "device_init_s": device_s,
        "cache_s": cache_s,
        "model_s": model_s,
        "train_images": history.num_examples * len(history.epochs),
        "train_s": train_s,
        "support_s": support_s,
        "evaluate_s": evaluate_s,
        "audit_s": audit_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, required=True)
    parser.add_argument("--launch", choices=("cold", "warm"), required=True)
    parser.add_argument("--epochs", type=int, default=1)
    arguments = parser.parse_args()
    if arguments.launch == "cold":
        print(json.dumps(message(arguments.site, epochs=arguments.epochs, since=None)))
        return
    from client.commands.join import WARM_MODULES

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # as the launcher: a module missing only costs import time later
            continue
    reader, writer = os.pipe()
    forked = time.perf_counter()
    child = os.fork()
    if child == 0:
        os.close(reader)
        code = 1
        try:
            figures = message(arguments.site, epochs=arguments.epochs, since=forked)
            os.write(writer, json.dumps(figures).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader) as stream:
        text = stream.read()
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not text:
        sys.exit("bench.site_message: the forked message failed")
    print(text)


if __name__ == "__main__":
    main()
