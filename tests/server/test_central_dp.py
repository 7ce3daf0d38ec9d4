"""Optional client-level central DP: Flower's wrapper at the server, clipping at the sites."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from client.app import app as client_app
from server.app import build_strategy, initial_weights, round_configs
from server.messaging import exchange
from server.settings import RunSettings
from server.strategy import base_aggregator
from sic_core import anchor_support
from sic_core.errors import ConfigError
from sic_core.wire import RecordKey
from tests.server.fedkit import FakeGrid, server_identity, write_site

SIZE = 16
CLIP = 0.05
NOISE = 0.5


def _settings(**overrides: object) -> RunSettings:
    return RunSettings.from_run_config(
        {
            "image-size": SIZE,
            "local-epochs": 1,
            "batch-size": 8,
            "min-sites": 2,
            "node-wait": 5.0,
            **overrides,
        }
    )


def _flat(record) -> np.ndarray:
    return np.concatenate([array.numpy().ravel() for array in record.values()])


def test_central_dp_is_off_by_default() -> None:
    strategy = build_strategy(_settings())
    assert not isinstance(strategy.aggregator, DifferentialPrivacyClientSideFixedClipping)


def test_central_dp_needs_a_mean_aggregator() -> None:
    with pytest.raises(ConfigError, match="central-dp: needs strategy fedavg or fedprox"):
        build_strategy(_settings(**{"central-dp": True, "strategy": "fedmedian"}))


def test_central_dp_clips_every_site_update_and_noises_the_mean(tmp_path: Path) -> None:
    settings = _settings(**{"central-dp": True, "central-dp-noise": NOISE, "central-dp-clip": CLIP})
    strategy = build_strategy(settings)
    assert isinstance(strategy.aggregator, DifferentialPrivacyClientSideFixedClipping)
    assert base_aggregator(strategy.aggregator).min_available_nodes == 2
    strategy.support = anchor_support(2, 3, 128, seed=0)
    nodes = {
        100 + index: {"site-config": str(write_site(tmp_path, name, size=SIZE, seed=index))}
        for index, name in enumerate(("site_a", "site_b"))
    }
    grid = FakeGrid(client_app, nodes)
    arrays, _ = initial_weights(settings)
    train_config, _ = round_configs(settings)
    with server_identity():
        messages = strategy.configure_train(1, arrays, ConfigRecord(dict(train_config)), grid)
        result = exchange(grid, messages, sites=strategy.sites, timeout=120, poll_interval=0.01)
        aggregated, _ = strategy.aggregate_train(1, result.replies)
    assert [o.status for o in strategy.reports["train"].outcomes] == ["ok", "ok"]
    # The sites still got the global support set next to the weights.
    assert all(str(RecordKey.SUPPORT) in m.content for _, m in grid.delivered)
    sent = _flat(arrays)
    updates = []
    for _, reply in grid.sent_by_sites:
        update = _flat(reply.content[str(RecordKey.ARRAYS)]) - sent
        assert np.linalg.norm(update) <= CLIP * (1 + 1e-4)  # clipped at the site
        updates.append(update)
    # The round ran: the aggregate is the mean of the clipped updates plus Gaussian noise
    # of standard deviation noise * clip / sites.
    assert aggregated is not None
    residual = _flat(aggregated) - (sent + np.mean(updates, axis=0))
    assert residual.std() == pytest.approx(NOISE * CLIP / 2, rel=0.05)
