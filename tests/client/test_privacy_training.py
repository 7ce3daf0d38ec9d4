"""DP-SGD wiring and the DP support release."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants.utils import get_noise_multiplier
from torch import nn

from client.config import PrivacyConfig
from client.privacy.dp_sgd import dp_model_issues, plan_dp_sgd, train_dp_sgd, validate_for_dp
from client.privacy.ledger import PrivacyLedger, epsilon_of, noise_for_epsilon
from client.privacy.support_release import plan_support_release, private_cluster_statistics
from client.training import (
    RoundSettings,
    plan_private_round,
    private_support_statistics,
    train_privately,
)
from sic_core import SupportSet, anchor_support, create_model, list_encoders
from sic_core.errors import ConfigError
from sic_core.training import TrainConfig


@pytest.mark.parametrize("name", list_encoders())
def test_registered_encoders_pass_the_dp_checks(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 1, 2, n_shot=1, proj_dim=8, width=4)
    assert dp_model_issues(model, anchor_support(2, 1, 8)) == []


def test_a_batch_norm_subclass_is_caught() -> None:
    class SneakyNorm(nn.BatchNorm2d):
        pass

    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=8, width=4)
    model.embedder.encoder.layers[0][1] = SneakyNorm(4)
    issues = dp_model_issues(model, anchor_support(2, 1, 8))
    assert any("SneakyNorm" in issue for issue in issues)
    assert any("buffers" in issue for issue in issues)
    with pytest.raises(ConfigError, match="SneakyNorm"):
        validate_for_dp(model, anchor_support(2, 1, 8))


def test_dp_sgd_trains_and_matches_its_plan() -> None:
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=8, width=4)
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.rand(40, 1, 16, 16), torch.arange(40) % 2
    config = TrainConfig(epochs=2, batch_size=10)
    history = train_dp_sgd(
        model,
        images,
        labels,
        anchor_support(2, 1, 8),
        config,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert len(history.epochs) == 2 and history.num_examples == 40
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    plan = plan_dp_sgd(40, config, noise_multiplier=1.0, run_id="1", round_=3)
    assert plan.sample_rate == pytest.approx(0.25) and plan.steps == 8 and plan.round == 3
    # The Opacus hooks are gone: the model still runs outside DP-SGD.
    assert model(images[:2]).shape == (2, 2)


def test_support_release_has_bounded_sensitivity_and_one_cluster_per_image() -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.rand(30, 8, generator=generator) * 3
    labels = torch.arange(30) % 2
    support = SupportSet(
        torch.rand(4, 8, generator=generator), torch.tensor([0, 0, 1, 1]), torch.full((4,), -1)
    )

    def release(e: torch.Tensor, y: torch.Tensor):
        return private_cluster_statistics(
            e, y, support, clip_norm=0.5, noise_multiplier=0.0, generator=torch.Generator()
        )

    full = release(embeddings, labels)
    assert full.counts.sum(dim=1).tolist() == [15, 15]
    assert (full.sums.norm(dim=2) <= 0.5 * full.counts + 1e-5).all()
    without_one = release(embeddings[1:], labels[1:])
    change = torch.cat(
        [
            (full.sums - without_one.sums).flatten() / 0.5,
            (full.counts - without_one.counts).flatten(),
        ]
    )
    assert change.norm() <= math.sqrt(2) + 1e-5
    noised = private_cluster_statistics(
        embeddings, labels, support, clip_norm=0.5, noise_multiplier=1.0, generator=generator
    )
    assert not torch.equal(noised.sums, full.sums)
    planned = plan_support_release(noise_multiplier=1.0, run_id="1", round_=1)
    assert planned.noise_multiplier == pytest.approx(1 / math.sqrt(2))


def test_noise_for_epsilon_is_opacus_get_noise_multiplier_for_one_mechanism() -> None:
    expected = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=20, accountant="rdp"
    )
    assert noise_for_epsilon(3.0, delta=1e-5, sample_rate=0.1, steps=20) == expected


def test_noise_for_epsilon_refuses_a_target_the_support_release_alone_exceeds() -> None:
    costly = plan_support_release(noise_multiplier=1.0, run_id="1", round_=1)
    with pytest.raises(ConfigError, match="alone cost epsilon"):
        noise_for_epsilon(1.0, delta=1e-5, sample_rate=0.1, steps=20, alongside=[costly])


def test_epsilon_per_round_makes_every_round_cost_the_target(tmp_path) -> None:
    privacy = PrivacyConfig(enabled=True, epsilon_per_round=2.0)
    ledger = PrivacyLedger.in_state_dir(
        tmp_path, delta=privacy.target_delta, max_epsilon=privacy.max_epsilon
    )
    torch.manual_seed(0)
    model = create_model("bcos_cnn_small", 1, 2, n_shot=1, proj_dim=8, width=4)
    images, labels = torch.rand(24, 1, 16, 16), torch.arange(24) % 2
    support = anchor_support(2, 1, 8)
    for round_ in (1, 2):
        settings = RoundSettings(
            server_round=round_,
            local_epochs=1,
            lr=1e-3,
            batch_size=8,
            seed=0,
            anchor_rounds=0,
            dp=True,
        )
        train_privately(
            model, images, labels, settings, support, privacy=privacy, ledger=ledger, run_id="9"
        )
        private_support_statistics(
            model,
            images,
            labels,
            support,
            privacy=privacy,
            ledger=ledger,
            run_id="9",
            server_round=round_,
            seed=0,
        )
        # The round's own ε (DP-SGD and support release, fresh accountant) is the target.
        assert 2.0 - 0.01 <= ledger.round_epsilon("9", round_) <= 2.0
    assert [m.kind for m in ledger.mechanisms] == ["dp-sgd", "support"] * 2
    assert 2.0 < ledger.epsilon < 4.0  # rounds compose, sub-linearly
    # A smaller site (larger sample rate) needs more noise for the same round ε.
    settings = RoundSettings(
        server_round=3, local_epochs=1, lr=1e-3, batch_size=8, seed=0, anchor_rounds=0
    )
    small, _ = plan_private_round(12, settings, privacy=privacy, delta=1e-5, run_id="9")
    large, _ = plan_private_round(240, settings, privacy=privacy, delta=1e-5, run_id="9")
    assert small.noise_multiplier > large.noise_multiplier
    # An anchor round has no support release: DP-SGD alone costs the target.
    anchored = RoundSettings(
        server_round=3, local_epochs=1, lr=1e-3, batch_size=8, seed=0, anchor_rounds=3
    )
    sgd, support = plan_private_round(240, anchored, privacy=privacy, delta=1e-5, run_id="9")
    assert support is None
    assert 2.0 - 0.01 <= epsilon_of([sgd], 1e-5) <= 2.0
    assert sgd.noise_multiplier < large.noise_multiplier
