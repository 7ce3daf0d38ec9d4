"""``compute.device``: resolved, refused when missing, and where the site's computations run.

The CPU tests run everywhere: ``auto`` computes on the CPU of a machine without CUDA, and
``cuda`` stops ``client check``, ``client join`` and a ClientApp message with an error that
names the field. The ``gpu`` tests train (with and without DP-SGD), compute support
statistics, evaluate and audit one site on ``cuda`` and check that the model, every batch
through the encoder and the audit ran there (``bench/gpu.sh`` runs them on a lent GPU).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from typer.testing import CliRunner

import client.app as client_module
import client.commands.join as join_module
from client.app import app
from client.cli import app as cli
from client.config import load_site_config
from client.device import describe_device, device_label, resolve_device
from server.sites import site_device_in
from sic_core import create_model
from sic_core.errors import ConfigError
from sic_core.wire import (
    SITE_DEVICE_PATTERN,
    SUPPORT_BUFFER_KEYS,
    ArrayKey,
    ConfigKey,
    QueryName,
    RecordKey,
    SiteKey,
    parse_error,
)
from tests.server.fedkit import server_identity, write_site

# Messages are built from sic_core alone, so that these tests need no coordinator packages
# (MLflow) on a GPU machine.
SIZE = 16
SUPPORT_MESSAGE_TYPE = f"{MessageType.QUERY}.{QueryName.SUPPORT}"
RUNNER = CliRunner()
NO_CUDA = not torch.cuda.is_available()


def _site(root: Path, name: str, device: str, **extra: object) -> Path:
    path = write_site(root, name, size=SIZE)
    config = yaml.safe_load(path.read_text())
    config["compute"] = {"device": device}
    config.update(extra)
    path.write_text(yaml.safe_dump(config))
    return path


def _incoming(message_type: str, *, server_round: int = 2) -> Message:
    """A message as the server sends it: global weights, support set and round config."""
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", in_channels=1, num_classes=2)
    arrays = ArrayRecord(
        {
            key: Array(value.numpy())
            for key, value in model.state_dict().items()
            if key not in SUPPORT_BUFFER_KEYS
        }
    )
    config = ConfigRecord(
        {
            str(ConfigKey.SERVER_ROUND): server_round,
            str(ConfigKey.ENCODER): "bcos_cnn_small",
            str(ConfigKey.NUM_CLASSES): 2,
            str(ConfigKey.N_SHOT): 3,
            str(ConfigKey.PROJ_DIM): 128,
            str(ConfigKey.IMAGE_SIZE): SIZE,
            str(ConfigKey.LOCAL_EPOCHS): 1,
            str(ConfigKey.LR): 5e-4,
            str(ConfigKey.BATCH_SIZE): 8,
            str(ConfigKey.SEED): 0,
            str(ConfigKey.DP): False,
            str(ConfigKey.ANCHOR_ROUNDS): 1,
        }
    )
    generator = torch.Generator().manual_seed(0)
    support = ArrayRecord(
        {
            str(ArrayKey.VECTORS): Array(torch.rand(6, 128, generator=generator).numpy()),
            str(ArrayKey.LABELS): Array(torch.tensor([0, 0, 0, 1, 1, 1]).numpy()),
        }
    )
    content = RecordDict(
        {
            str(RecordKey.ARRAYS): arrays,
            str(RecordKey.CONFIG): config,
            str(RecordKey.SUPPORT): support,
        }
    )
    with server_identity():
        message = Message(content, dst_node_id=5, message_type=message_type)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def _context(site_yaml: Path) -> Context:
    return Context(1, 5, {"site-config": str(site_yaml)}, RecordDict(), {})


class DeviceSpy:
    """Records, per phase, the device of every model the ClientApp builds and of every batch
    that goes through its encoder (training, embedding, evaluation and the audit alike)."""

    def __init__(self) -> None:
        self.phase = "none"
        self.models: dict[str, set[torch.device]] = defaultdict(set)
        self.batches: dict[str, set[torch.device]] = defaultdict(set)

    def watch(self, model: torch.nn.Module) -> None:
        self.models[self.phase].add(next(model.parameters()).device)

        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            self.batches[self.phase].add(inputs[0].device)

        model.embedder.register_forward_pre_hook(record)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[DeviceSpy]:
    watcher = DeviceSpy()
    build_model, audit_and_report = client_module.build_model, client_module.audit_and_report

    def watched_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        watcher.watch(model)
        return model

    def watched_audit(*args, **kwargs):
        phase, watcher.phase = watcher.phase, "audit"
        try:
            return audit_and_report(*args, **kwargs)
        finally:
            watcher.phase = phase

    monkeypatch.setattr(client_module, "build_model", watched_build)
    monkeypatch.setattr(client_module, "audit_and_report", watched_audit)
    yield watcher


def _run_round(site: Path, spy: DeviceSpy) -> dict[str, Message]:
    """Train, support and evaluate at one site; every reply must be a success."""
    context, replies = _context(site), {}
    for phase, message_type in (
        ("train", MessageType.TRAIN),
        ("support", SUPPORT_MESSAGE_TYPE),
        ("evaluate", MessageType.EVALUATE),
    ):
        spy.phase = phase
        reply = app(_incoming(message_type), context)
        assert not reply.has_error(), reply.error
        replies[phase] = reply
    return replies


def _assert_ran_on(spy: DeviceSpy, replies: dict[str, Message], device: torch.device) -> None:
    for phase in ("train", "support", "evaluate"):
        assert spy.models[phase] == {device}, phase
        assert spy.batches[phase] == {device}, phase
    assert spy.batches["audit"] == {device}  # the explanations and perturbation metrics
    for reply in replies.values():
        label = reply.content[str(RecordKey.SITE)][str(SiteKey.DEVICE)]
        assert label.split(" ")[0] == f"{device.type}:{device.index}".removesuffix(":None")
        assert site_device_in(reply) == label
    arrays = replies["train"].content[str(RecordKey.ARRAYS)]
    assert all(array.numpy().dtype == "float32" for array in arrays.values())


# ----------------------------------------------------------------------- the setting itself
def test_the_default_is_auto_and_unknown_devices_name_the_allowed_values(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_d", size=SIZE)
    assert load_site_config(site).compute.device == "auto"
    config = yaml.safe_load(site.read_text())
    for wrong in ("gpu", "cuda:", "cuda:x", "CPU", "mps"):
        config["compute"] = {"device": wrong}
        site.write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError) as raised:
            load_site_config(site)
        message = str(raised.value)
        assert "compute.device: expected auto, cpu, cuda or cuda:N" in message, message
        assert repr(wrong) in message
    config["compute"] = {"devise": "cpu"}
    site.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"compute\.devise: unknown field; did you mean"):
        load_site_config(site)


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert device_label(torch.device("cpu")) == "cpu"
    assert describe_device(torch.device("cpu")).startswith("cpu (")


def test_auto_picks_the_first_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_missing_gpu_is_a_named_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError) as raised:
        resolve_device("cuda")
    message = str(raised.value)
    assert message.startswith("compute.device: 'cuda' asks for a CUDA GPU but ")
    assert "set compute.device to cpu (or auto)" in message
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")
    with pytest.raises(ConfigError) as raised:
        resolve_device("cuda:3")
    message = str(raised.value)
    assert "compute.device: 'cuda:3' asks for a CUDA GPU" in message
    assert "this machine has 1 CUDA device: cuda:0 NVIDIA H100 80GB HBM3" in message


def test_the_device_label_carries_the_gpu_model_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: 'GPU "x"; rm -rf /\n' * 9)
    label = device_label(torch.device("cuda", 0))
    assert SITE_DEVICE_PATTERN.fullmatch(label) is not None, label
    assert label.startswith("cuda:0 GPU x rm -rf ") and "/" not in label and "\n" not in label
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA A100-SXM4-40GB")
    assert device_label(torch.device("cuda", 2)) == "cuda:2 NVIDIA A100-SXM4-40GB"


# ----------------------------------------------------------------------- CLI and ClientApp
@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_check_prints_the_device_and_refuses_a_missing_gpu(tmp_path: Path) -> None:
    good = _site(tmp_path, "site_auto", "auto")
    result = RUNNER.invoke(cli, ["check", "--site", str(good)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "Compute device: cpu (" in result.output
    missing = _site(tmp_path, "site_gpu", "cuda")
    result = RUNNER.invoke(cli, ["check", "--site", str(missing)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    output = result.output.replace("\n", " ")
    assert "invalid config:" in output and str(missing) in output
    assert "compute.device: 'cuda' asks for a CUDA GPU but" in output
    assert "can train" not in output  # it stopped before reading any data


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_join_refuses_a_missing_gpu_before_anything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: list[str] = []
    monkeypatch.setattr(join_module, "_check_site_data", lambda *a, **k: reached.append("data"))
    monkeypatch.setattr(join_module, "_wait_for_superlink", lambda *a: reached.append("link"))
    for device in ("cuda", "cuda:1"):
        site = _site(tmp_path, f"site_{device.replace(':', '')}", device)
        result = RUNNER.invoke(
            cli,
            ["join", "--site", str(site), "--insecure", "--allow-any-app"],
            env={"COLUMNS": "300"},
        )
        output = result.output.replace("\n", " ")
        assert result.exit_code == 2, output
        assert f"config_error: {site}: compute.device: '{device}' asks for a CUDA GPU" in output
    assert reached == []  # neither the data nor the SuperLink was touched


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_a_message_at_a_site_whose_gpu_is_missing_fails_with_a_code(tmp_path: Path) -> None:
    site = _site(tmp_path, "site_gone", "cuda")
    reply = app(_incoming(MessageType.TRAIN), _context(site))
    assert reply.has_error()
    assert parse_error(reply.error.reason) == ("config_error", "site_gone")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
def test_auto_trains_supports_evaluates_and_audits_on_the_cpu_here(
    tmp_path: Path, spy: DeviceSpy
) -> None:
    replies = _run_round(_site(tmp_path, "site_cpu", "auto"), spy)
    _assert_ran_on(spy, replies, torch.device("cpu"))
    assert replies["train"].content[str(RecordKey.SITE)][str(SiteKey.DEVICE)] == "cpu"


# ----------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
def test_a_site_trains_supports_evaluates_and_audits_on_cuda(
    tmp_path: Path, spy: DeviceSpy
) -> None:
    replies = _run_round(_site(tmp_path, "site_cuda", "cuda"), spy)
    _assert_ran_on(spy, replies, torch.device("cuda", 0))
    metrics = replies["evaluate"].content[str(RecordKey.METRICS)]
    assert metrics["xai/completeness_max_rel_err"] < 1e-4  # float32 explanations stay exact
    label = replies["train"].content[str(RecordKey.SITE)][str(SiteKey.DEVICE)]
    assert label.startswith("cuda:0 ") and SITE_DEVICE_PATTERN.fullmatch(label)


@pytest.mark.parametrize(
    ("setting", "device"),
    [
        ("cpu", torch.device("cpu")),
        pytest.param("cuda", torch.device("cuda", 0), marks=pytest.mark.gpu),
    ],
)
def test_dp_sgd_and_the_private_support_release_run_on_the_device(
    tmp_path: Path, spy: DeviceSpy, setting: str, device: torch.device
) -> None:
    site = _site(tmp_path, "site_dp", setting, privacy={"enabled": True})
    replies = _run_round(site, spy)
    _assert_ran_on(spy, replies, device)
    assert replies["train"].content[str(RecordKey.METRICS)]["dp.epsilon"] > 0


@pytest.mark.gpu
def test_check_names_the_gpu_and_its_memory(tmp_path: Path) -> None:
    site = _site(tmp_path, "site_check", "cuda:0")
    result = RUNNER.invoke(cli, ["check", "--site", str(site)], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    name = torch.cuda.get_device_name(0)
    assert f"Compute device: cuda:0 {name} (" in result.output and "GiB)" in result.output
