"""Anchor rounds train every site against the run's anchors, the server's, in every round."""

from __future__ import annotations

from typing import Any

import torch

import client.training as training
from client.config import PrivacyConfig
from client.privacy.ledger import PrivacyLedger
from client.training import RoundSettings, train_locally, train_privately
from sic_core import SupportSet, anchor_support, create_model

RUN_SEED = 7


def _settings(server_round: int, *, dp: bool) -> RoundSettings:
    return RoundSettings(
        server_round=server_round,
        local_epochs=1,
        lr=1e-3,
        batch_size=8,
        seed=RUN_SEED,
        anchor_rounds=2,
        dp=dp,
    )


def _assert_server_anchors(supports: list[SupportSet]) -> None:
    # server.app seeds the run's anchors (and evaluates against them) with the run seed.
    server = anchor_support(2, 1, 8, seed=RUN_SEED)
    assert len(supports) == 2
    for support in supports:
        assert torch.equal(support.vectors.cpu(), server.vectors)
        assert torch.equal(support.labels.cpu(), server.labels)


def test_plain_anchor_rounds_train_against_the_servers_anchors(monkeypatch) -> None:
    seen: list[SupportSet] = []
    real_train_sic = training.train_sic

    def spy(*args: Any, fixed_support: SupportSet | None = None, **kwargs: Any):
        assert fixed_support is not None
        seen.append(fixed_support)
        return real_train_sic(*args, fixed_support=fixed_support, **kwargs)

    monkeypatch.setattr(training, "train_sic", spy)
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=8, width=4)
    images, labels = torch.rand(16, 1, 16, 16), torch.arange(16) % 2
    for server_round in (1, 2):
        train_locally(model, images, labels, _settings(server_round, dp=False))
    _assert_server_anchors(seen)


def test_private_anchor_rounds_train_against_the_servers_anchors(monkeypatch, tmp_path) -> None:
    seen: list[SupportSet] = []
    real_train_dp_sgd = training.train_dp_sgd

    def spy(model, images, labels, supports: SupportSet, *args: Any, **kwargs: Any):
        seen.append(supports)
        return real_train_dp_sgd(model, images, labels, supports, *args, **kwargs)

    monkeypatch.setattr(training, "train_dp_sgd", spy)
    privacy = PrivacyConfig(enabled=True, epsilon_per_round=2.0)
    ledger = PrivacyLedger.in_state_dir(
        tmp_path, delta=privacy.target_delta, max_epsilon=privacy.max_epsilon
    )
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=8, width=4)
    images, labels = torch.rand(16, 1, 16, 16), torch.arange(16) % 2
    not_the_anchors = anchor_support(2, 1, 8, seed=RUN_SEED + 100)
    for server_round in (1, 2):
        train_privately(
            model,
            images,
            labels,
            _settings(server_round, dp=True),
            not_the_anchors,
            privacy=privacy,
            ledger=ledger,
            run_id="1",
        )
    _assert_server_anchors(seen)
