"""The ClientApp's handlers and its error mod, called in-process with real messages."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.app as client_module
from client.app import STATE_LOCAL_SUPPORT, STATE_PROGRESS, app
from server.app import initial_weights, round_configs
from server.settings import RunSettings
from server.strategy import SUPPORT_MESSAGE_TYPE, support_record
from server.validation import check_eval_reply
from sic_core.support import SupportSet
from sic_core.wire import (
    SUPPORT_METRIC_KEYS,
    TRAIN_METRIC_KEYS,
    ArrayKey,
    RecordKey,
    ReportKey,
    SiteKey,
    eval_metric_keys,
    parse_error,
)
from tests.server.fedkit import server_identity, write_site

SIZE = 16
SETTINGS = RunSettings.from_run_config({"image-size": SIZE, "local-epochs": 1, "batch-size": 8})


def global_support(seed: int = 0) -> SupportSet:
    generator = torch.Generator().manual_seed(seed)
    return SupportSet(
        vectors=torch.rand(6, 128, generator=generator),
        labels=torch.tensor([0, 0, 0, 1, 1, 1]),
        indices=torch.full((6,), -1),
    )


def incoming(message_type: str, *, server_round: int = 1, with_support: bool = True) -> Message:
    """A message as the server sends it (weights, support set, round config)."""
    arrays, _ = initial_weights(SETTINGS)
    train_config, evaluate_config = round_configs(SETTINGS)
    config = ConfigRecord(
        dict(train_config if message_type == MessageType.TRAIN else evaluate_config)
    )
    config["server-round"] = server_round
    content = RecordDict({str(RecordKey.ARRAYS): arrays, str(RecordKey.CONFIG): config})
    if with_support:
        content[str(RecordKey.SUPPORT)] = support_record(global_support())
    with server_identity():
        message = Message(content, dst_node_id=5, message_type=message_type)
    message.metadata.__dict__["_message_id"] = message.object_id
    return message


def context_for(site_yaml: Path | str) -> Context:
    return Context(1, 5, {"site-config": str(site_yaml)}, RecordDict(), {})


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_site(tmp_path_factory.mktemp("sites"), "site_x", size=SIZE)


def test_train_reply_has_the_fixed_schema_unit_filters_and_the_site_name(site: Path) -> None:
    message = incoming(MessageType.TRAIN)
    reply = app(message, context_for(site))
    assert not reply.has_error(), reply.error
    assert set(reply.content.keys()) == {"arrays", "metrics", "site"}
    assert reply.content[str(RecordKey.SITE)][str(SiteKey.NAME)] == "site_x"
    metrics = reply.content[str(RecordKey.METRICS)]
    assert set(metrics.keys()) == TRAIN_METRIC_KEYS
    assert metrics["num-examples"] == 24  # training images, not batches
    sent = message.content[str(RecordKey.ARRAYS)]
    returned = reply.content[str(RecordKey.ARRAYS)]
    assert set(returned.keys()) == set(sent.keys())
    conv = next(
        key for key in returned if key.endswith("weight") and returned[key].numpy().ndim == 4
    )
    filters = returned[conv].numpy()
    norms = np.linalg.norm(filters.reshape(filters.shape[0], -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert not np.array_equal(filters, sent[conv].numpy())  # it trained


def test_support_reply_for_a_site_missing_a_class(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_y", size=SIZE, train_per_class=(10, 0))
    reply = app(incoming(SUPPORT_MESSAGE_TYPE, with_support=False), context_for(site))
    assert not reply.has_error(), reply.error
    metrics = reply.content[str(RecordKey.METRICS)]
    assert set(metrics.keys()) == SUPPORT_METRIC_KEYS
    assert metrics["support.classes-present"] == 1
    stats = reply.content[str(RecordKey.STATS)]
    sums, counts = stats[str(ArrayKey.SUMS)].numpy(), stats[str(ArrayKey.COUNTS)].numpy()
    assert sums.shape == (2, 3, 128) and counts.shape == (2, 3)
    assert counts[0].sum() == 10 and counts[1].sum() == 0
    assert np.all(sums[1] == 0)


def test_evaluate_scores_with_local_supports_and_keeps_them_at_the_site(site: Path) -> None:
    context = context_for(site)
    reply = app(incoming(MessageType.EVALUATE, server_round=3), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content[str(RecordKey.METRICS)]
    assert set(metrics.keys()) == eval_metric_keys(2)
    assert check_eval_reply(reply.content, num_classes=2) is None
    assert metrics["xai/completeness_max_rel_err"] < 1e-4
    assert 0 < metrics["xai.seconds"] < metrics["val.seconds"]
    assert metrics["num-examples"] == 12
    assert metrics["val.local-supports"] == 6
    for key in ("val.auroc", "val.balanced-accuracy", "val.accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    indices = context.state[STATE_LOCAL_SUPPORT]["indices"].numpy()
    assert indices.shape == (6,) and (indices >= 0).all()
    assert context.state[STATE_PROGRESS]["last-eval-round"] == 3
    reports = Path(site).parent / "state" / "reports"
    kept = json.loads((reports / "round_003" / "report.json").read_text())
    assert kept["provenance"]["round"] == 3 and kept["gallery"]
    assert (reports / "round_003" / "report.html").exists()
    assert (Path(site).parent / "state" / "model" / "latest.pt").exists()
    sent = json.loads(reply.content[str(RecordKey.REPORT)][str(ReportKey.JSON)])
    assert sent["redacted"] is True and "gallery" not in sent  # this site does not share
    assert sent["provenance"]["audit_set"] == kept["provenance"]["audit_set"]


def test_state_counts_rounds_across_messages(site: Path) -> None:
    context = context_for(site)
    for server_round in (1, 2):
        assert not app(incoming(MessageType.TRAIN, server_round=server_round), context).has_error()
    progress = context.state[STATE_PROGRESS]
    assert progress["rounds-trained"] == 2 and progress["last-train-round"] == 2


def test_config_error_leaves_the_site_as_a_code_and_the_site_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = write_site(tmp_path, "site_z", size=SIZE)
    config = yaml.safe_load(site.read_text())
    config["data"]["image_size"] = 2 * SIZE
    site.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.ERROR, logger="client.mods"):
        reply = app(incoming(MessageType.TRAIN), context_for(site))
    assert reply.has_error()
    assert reply.error.reason == "config_error@site_z"
    assert "image_size" in caplog.text  # the full error stays in the site's log


def test_unexpected_exception_becomes_internal_error_without_its_text(
    site: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("cannot open /hospital/patient_0042/chest.dcm")

    monkeypatch.setattr(client_module, "load_site_data", broken)
    with caplog.at_level(logging.ERROR, logger="client.mods"):
        reply = app(incoming(MessageType.EVALUATE), context_for(site))
    assert reply.error.reason == "internal_error@site_x"
    assert parse_error(reply.error.reason) == ("internal_error", "site_x")
    assert "patient_0042" in caplog.text


def test_missing_node_config_is_a_config_error_without_a_name() -> None:
    reply = app(incoming(MessageType.TRAIN), Context(1, 5, {}, RecordDict(), {}))
    assert reply.error.reason == "config_error"


def test_message_without_support_set_is_an_invalid_message(site: Path) -> None:
    reply = app(incoming(MessageType.TRAIN, with_support=False), context_for(site))
    assert reply.error.reason == "invalid_message@site_x"


def private_site(root: Path, name: str, **privacy: float) -> Path:
    site = write_site(root, name, size=SIZE)
    config = yaml.safe_load(site.read_text())
    config["privacy"] = {"enabled": True, "noise_multiplier": 1.0, **privacy}
    site.write_text(yaml.safe_dump(config))
    return site


def test_dp_training_records_its_mechanism_and_reports_epsilon(tmp_path: Path) -> None:
    site = private_site(tmp_path, "site_dp", max_epsilon=50.0)
    context = context_for(site)
    first = app(incoming(MessageType.TRAIN, server_round=1), context)
    assert not first.has_error(), first.error
    epsilon_1 = first.content[str(RecordKey.METRICS)]["dp.epsilon"]
    second = app(incoming(MessageType.TRAIN, server_round=2), context)
    epsilon_2 = second.content[str(RecordKey.METRICS)]["dp.epsilon"]
    assert 0 < epsilon_1 < epsilon_2  # the budget adds up across rounds (and processes)
    ledger = yaml.safe_load((site.parent / "state" / "privacy_ledger.json").read_text())
    assert [m["round"] for m in ledger["mechanisms"]] == [1, 2]


def test_dp_site_refuses_a_round_beyond_its_budget(tmp_path: Path) -> None:
    site = private_site(tmp_path, "site_poor", max_epsilon=0.01)
    reply = app(incoming(MessageType.TRAIN), context_for(site))
    assert reply.error.reason == "privacy_budget_exhausted@site_poor"
    assert not (site.parent / "state" / "privacy_ledger.json").exists()


def test_dp_support_release_is_noised_around_the_global_support(tmp_path: Path) -> None:
    site = private_site(tmp_path, "site_dps", max_epsilon=50.0)
    reply = app(incoming(SUPPORT_MESSAGE_TYPE, with_support=True), context_for(site))
    assert not reply.has_error(), reply.error
    counts = reply.content[str(RecordKey.STATS)][str(ArrayKey.COUNTS)].numpy()
    assert not np.allclose(counts, np.round(counts))  # Gaussian noise on the counts
    assert reply.content[str(RecordKey.METRICS)]["support.classes-present"] == 2
    ledger = yaml.safe_load((site.parent / "state" / "privacy_ledger.json").read_text())
    assert [m["kind"] for m in ledger["mechanisms"]] == ["support"]
