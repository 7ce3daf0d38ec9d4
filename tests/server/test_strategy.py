"""The SIC strategy in-process: validation, attribution, ordering, support merge."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from server.messaging import NotEnoughSitesError, exchange, wait_for_nodes
from server.sites import SiteDirectory
from server.strategy import KRUM_STRATEGIES, STRATEGIES, SicStrategy, make_aggregator
from sic_core.errors import ConfigError
from sic_core.support import SupportSet
from sic_core.wire import (
    ArrayKey,
    RecordKey,
    SiteKey,
    SupportMetric,
    TrainMetric,
    format_error,
)
from tests.server.fedkit import SERVER_NODE, FakeGrid, server_identity

NODES = {11: "site_a", 22: "site_b", 33: "site_c"}
SHAPES = {"layer.weight": (4, 3), "layer.scale": (4,)}


def global_arrays() -> ArrayRecord:
    return ArrayRecord({key: Array(np.zeros(shape, np.float32)) for key, shape in SHAPES.items()})


def train_metrics(num_examples: int, loss: float = 0.5) -> MetricRecord:
    return MetricRecord(
        {
            str(TrainMetric.NUM_EXAMPLES): num_examples,
            str(TrainMetric.LOSS): loss,
            str(TrainMetric.EPOCHS): 1,
            str(TrainMetric.SECONDS): 0.1,
            str(TrainMetric.STARTUP): 1.0,
            str(TrainMetric.QUARANTINED): 0,
            str(TrainMetric.DP_EPSILON): 0.0,
            str(TrainMetric.COLLAPSED): 0,
        }
    )


def train_reply(message: Message, site: str, value: float, num_examples: int) -> Message:
    arrays = ArrayRecord(
        {key: Array(np.full(shape, value, np.float32)) for key, shape in SHAPES.items()}
    )
    return Message(
        RecordDict(
            {
                str(RecordKey.ARRAYS): arrays,
                str(RecordKey.METRICS): train_metrics(num_examples),
                str(RecordKey.SITE): ConfigRecord({str(SiteKey.NAME): site}),
            }
        ),
        reply_to=message,
    )


def site_values(node: int) -> tuple[float, int]:
    """Each site's (weight value, number of examples)."""
    return {11: (1.0, 10), 22: (2.0, 30), 33: (4.0, 60)}[node]


def honest_app(message: Message, context: Context) -> Message:
    value, count = site_values(context.node_id)
    return train_reply(message, NODES[context.node_id], value, count)


def make_strategy(name: str = "fedavg", **kwargs: float) -> SicStrategy:
    strategy = SicStrategy(
        make_aggregator(name, min_sites=2, **kwargs),
        num_classes=2,
        n_shot=2,
        proj_dim=3,
        node_wait=1.0,
    )
    strategy.support = SupportSet(
        vectors=torch.ones(4, 3), labels=torch.tensor([0, 0, 1, 1]), indices=torch.full((4,), -1)
    )
    return strategy


def train_round(strategy: SicStrategy, grid: FakeGrid, server_round: int = 1):
    with server_identity():
        messages = strategy.configure_train(server_round, global_arrays(), ConfigRecord(), grid)
        result = exchange(grid, messages, sites=strategy.sites, timeout=1.0, poll_interval=0.01)
        return strategy.aggregate_train(server_round, result.replies)


def test_fedavg_weights_by_examples_and_attributes_every_site() -> None:
    strategy = make_strategy()
    arrays, metrics = train_round(strategy, FakeGrid(honest_app, {n: {} for n in NODES}))
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), expected, rtol=1e-6)
    assert metrics is not None and math.isclose(metrics[str(TrainMetric.LOSS)], 0.5)
    report = strategy.reports["train"]
    assert [(o.site, o.status) for o in report.outcomes] == [
        ("site_a", "ok"),
        ("site_b", "ok"),
        ("site_c", "ok"),
    ]
    assert report.ok[2].metrics[str(TrainMetric.NUM_EXAMPLES)] == 60


def test_train_message_carries_the_global_support_set() -> None:
    grid = FakeGrid(honest_app, {n: {} for n in NODES})
    train_round(make_strategy(), grid)
    for _, message in grid.delivered:
        support = message.content[str(RecordKey.SUPPORT)]
        assert support[str(ArrayKey.VECTORS)].numpy().shape == (4, 3)
        np.testing.assert_array_equal(support[str(ArrayKey.LABELS)].numpy(), [0, 0, 1, 1])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_reply_with_nan_or_inf_weights_is_rejected(bad: float) -> None:
    def app(message: Message, context: Context) -> Message:
        value, count = site_values(context.node_id)
        return train_reply(
            message, NODES[context.node_id], bad if context.node_id == 22 else value, count
        )

    strategy = make_strategy()
    arrays, _ = train_round(strategy, FakeGrid(app, {n: {} for n in NODES}))
    expected = (1.0 * 10 + 4.0 * 60) / 70
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), expected, rtol=1e-6)
    rejected = strategy.reports["train"].problems
    assert [(o.site, o.status, o.reason) for o in rejected] == [
        ("site_b", "rejected", "non_finite")
    ]


def test_reply_with_nan_metric_wrong_shape_or_keys_is_rejected() -> None:
    def app(message: Message, context: Context) -> Message:
        value, count = site_values(context.node_id)
        reply = train_reply(message, NODES[context.node_id], value, count)
        if context.node_id == 11:
            reply.content[str(RecordKey.METRICS)][str(TrainMetric.LOSS)] = math.nan
        if context.node_id == 22:
            reply.content[str(RecordKey.ARRAYS)]["layer.scale"] = Array(np.ones(5, np.float32))
        if context.node_id == 33:
            reply.content[str(RecordKey.METRICS)]["extra"] = 1.0
        return reply

    strategy = make_strategy()
    arrays, metrics = train_round(strategy, FakeGrid(app, {n: {} for n in NODES}))
    assert arrays is None and metrics is None
    reasons = {o.site: o.reason for o in strategy.reports["train"].problems}
    assert reasons == {"site_a": "non_finite", "site_b": "array_shape", "site_c": "metric_keys"}


def test_collapsed_local_training_is_left_out_with_its_reason() -> None:
    def app(message: Message, context: Context) -> Message:
        reply = honest_app(message, context)
        if context.node_id == 33:
            reply.content[str(RecordKey.METRICS)][str(TrainMetric.COLLAPSED)] = 1
        return reply

    strategy = make_strategy()
    arrays, _ = train_round(strategy, FakeGrid(app, {n: {} for n in NODES}))
    assert {o.site: o.reason for o in strategy.reports["train"].problems} == {"site_c": "collapsed"}
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), (10 + 60) / 40, rtol=1e-6)


def test_update_norm_bound_rejects_a_far_update() -> None:
    strategy = make_strategy()
    strategy.max_update_norm = 10.0  # site_c's update: 4.0 * sqrt(16) = 16 > 10
    arrays, _ = train_round(strategy, FakeGrid(honest_app, {n: {} for n in NODES}))
    assert {o.site: o.reason for o in strategy.reports["train"].problems} == {
        "site_c": "update_norm"
    }
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), (10 + 60) / 40, rtol=1e-6)


def test_site_error_is_attributed_by_name_and_the_round_continues() -> None:
    def app(message: Message, context: Context) -> Message:
        if context.node_id == 22:
            return Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, format_error("data_error", "site_b")),
                reply_to=message,
            )
        return honest_app(message, context)

    strategy = make_strategy()
    arrays, _ = train_round(strategy, FakeGrid(app, {n: {} for n in NODES}))
    np.testing.assert_allclose(arrays["layer.weight"].numpy(), (10 + 240) / 70, rtol=1e-6)
    failed = strategy.reports["train"].problems
    assert [(o.site, o.status, o.reason) for o in failed] == [("site_b", "failed", "data_error")]


def test_error_reply_from_the_superlink_is_attributed_through_the_message_it_answers() -> None:
    """Flower fills a lost site's error reply with the SuperLink's node id."""

    def app(message: Message, context: Context) -> Message:
        if context.node_id == 33:
            reply = Message(
                Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node unavailable at /some/host"),
                reply_to=message,
            )
            reply.metadata.__dict__["_src_node_id"] = SERVER_NODE
            return reply
        return honest_app(message, context)

    strategy = make_strategy()
    strategy.sites.learn(33, "site_c")
    train_round(strategy, FakeGrid(app, {n: {} for n in NODES}))
    failed = strategy.reports["train"].problems
    assert [(o.site, o.status, o.reason) for o in failed] == [
        ("site_c", "failed", "site_unavailable")
    ]


def test_free_text_error_is_not_passed_on() -> None:
    def app(message: Message, context: Context) -> Message:
        if context.node_id == 11:
            raise ValueError("cannot read /data/patient_0042/img.dcm")
        return honest_app(message, context)

    strategy = make_strategy()
    train_round(strategy, FakeGrid(app, {n: {} for n in NODES}))
    failed = strategy.reports["train"].problems
    assert [(o.status, o.reason) for o in failed] == [("failed", "unknown_error")]
    assert "patient" not in repr(strategy.reports)


def test_missing_reply_counts_as_a_failure() -> None:
    strategy = make_strategy()
    strategy.sites.learn(22, "site_b")
    arrays, _ = train_round(strategy, FakeGrid(honest_app, {n: {} for n in NODES}, offline={22}))
    assert arrays is not None
    assert [(o.site, o.status, o.reason) for o in strategy.reports["train"].problems] == [
        ("site_b", "failed", "no_reply")
    ]


def test_a_site_gone_since_an_earlier_round_counts_as_a_failure() -> None:
    strategy = make_strategy()
    train_round(strategy, FakeGrid(honest_app, {n: {} for n in NODES}))
    assert strategy.sites.name_of(33) == "site_c"
    train_round(strategy, FakeGrid(honest_app, {11: {}, 22: {}}), server_round=2)
    assert [(o.site, o.status, o.reason) for o in strategy.reports["train"].problems] == [
        ("site_c", "failed", "not_connected")
    ]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_aggregate_does_not_depend_on_reply_order(name: str) -> None:
    """Replies arrive in any order; the aggregate is bitwise the same (sorted by site)."""
    results = []
    # Three sites are too few for Krum with a malicious one (it needs 2 f + 3).
    options = {"byzantine_sites": 0} if name in KRUM_STRATEGIES else {}
    for order in itertools.permutations(NODES):
        strategy = make_strategy(name, **options)
        grid = FakeGrid(honest_app, {n: {} for n in NODES})
        with server_identity():
            messages = list(strategy.configure_train(1, global_arrays(), ConfigRecord(), grid))
            grid.push_messages(messages)
            replies = [
                grid.pull_messages([m.metadata.message_id])[0]
                for node in order
                for m in messages
                if m.metadata.dst_node_id == node
            ]
            for message in messages:
                strategy.sites.record_sent(
                    message.metadata.message_id, message.metadata.dst_node_id
                )
            arrays, _ = strategy.aggregate_train(1, replies)
        results.append({key: array.numpy().tobytes() for key, array in arrays.items()})
    assert all(result == results[0] for result in results)


def test_unknown_strategy_name_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'fedprox'"):
        make_aggregator("fedprx")


def test_fedprox_sends_the_proximal_weight() -> None:
    grid = FakeGrid(honest_app, {n: {} for n in NODES})
    train_round(make_strategy("fedprox", proximal_mu=0.25), grid)
    assert all(m.content[str(RecordKey.CONFIG)]["proximal-mu"] == 0.25 for _, m in grid.delivered)


def stats_reply(message: Message, site: str, sums: np.ndarray, counts: np.ndarray) -> Message:
    return Message(
        RecordDict(
            {
                str(RecordKey.STATS): ArrayRecord(
                    {
                        str(ArrayKey.SUMS): Array(sums.astype(np.float32)),
                        str(ArrayKey.COUNTS): Array(counts.astype(np.float32)),
                    }
                ),
                str(RecordKey.METRICS): MetricRecord(
                    {
                        str(SupportMetric.NUM_EXAMPLES): int(np.nansum(counts)),
                        str(SupportMetric.CLASSES_PRESENT): int((counts.sum(1) > 0).sum()),
                        str(SupportMetric.SECONDS): 0.1,
                        str(SupportMetric.STARTUP): 1.0,
                    }
                ),
                str(RecordKey.SITE): ConfigRecord({str(SiteKey.NAME): site}),
            }
        ),
        reply_to=message,
    )


def test_support_merge_uses_only_sites_that_have_the_class() -> None:
    """site_b has no class-1 images: class 1's global vectors come from site_a alone."""
    site_a_sums = np.array([[[2, 0, 0], [0, 2, 0]], [[0, 0, 6], [0, 0, 2]]], np.float32)
    site_a_counts = np.array([[2, 2], [3, 1]], np.float32)
    site_b_sums = np.array([[[4, 0, 0], [0, 4, 0]], [[0, 0, 0], [0, 0, 0]]], np.float32)
    site_b_counts = np.array([[4, 4], [0, 0]], np.float32)

    def app(message: Message, context: Context) -> Message:
        if context.node_id == 11:
            return stats_reply(message, "site_a", site_a_sums, site_a_counts)
        return stats_reply(message, "site_b", site_b_sums, site_b_counts)

    strategy = make_strategy()
    grid = FakeGrid(app, {11: {}, 22: {}})
    with server_identity():
        messages = strategy.configure_support(0, global_arrays(), ConfigRecord(), grid)
        result = exchange(grid, messages, sites=strategy.sites, timeout=1.0)
        support = strategy.aggregate_support(0, result.replies)
    assert support is not None and strategy.support is support
    class_one = support.vectors[support.labels == 1]
    # Both class-1 centroids lie on the third axis (site_a's clusters: (0,0,2) and (0,0,2)).
    np.testing.assert_allclose(class_one.numpy(), [[0, 0, 2], [0, 0, 2]], atol=1e-5)
    class_zero = sorted(support.vectors[support.labels == 0].tolist())
    np.testing.assert_allclose(class_zero, [[0, 1, 0], [1, 0, 0]], atol=1e-5)
    assert [o.site for o in strategy.reports["support"].ok] == ["site_a", "site_b"]


def test_support_reply_with_nan_counts_is_rejected_but_noisy_counts_are_merged() -> None:
    """DP-noised counts may be fractional or negative; NaN never is."""
    sums = np.array([[[2, 0, 0], [0, 2, 0]], [[0, 0, 2], [0, 0, 4]]], np.float32)

    def app(message: Message, context: Context) -> Message:
        if context.node_id == 11:
            counts = np.array([[2, 2], [-0.4, 2]], np.float32)  # noise made one cluster < 0
        else:
            counts = np.array([[2, np.nan], [1, 1]], np.float32)
        return stats_reply(message, NODES[context.node_id], sums, counts)

    strategy = make_strategy()
    grid = FakeGrid(app, {11: {}, 22: {}})
    with server_identity():
        messages = strategy.configure_support(1, global_arrays(), ConfigRecord(), grid)
        result = exchange(grid, messages, sites=strategy.sites, timeout=1.0)
        support = strategy.aggregate_support(1, result.replies)
    assert {o.site: o.reason for o in strategy.reports["support"].problems} == {
        "site_b": "non_finite"
    }
    assert [o.site for o in strategy.reports["support"].ok] == ["site_a"]
    class_one = support.vectors[support.labels == 1]
    np.testing.assert_allclose(class_one.numpy(), [[0, 0, 2], [0, 0, 2]], atol=1e-5)


def test_support_query_carries_the_current_global_support() -> None:
    grid = FakeGrid(honest_app, {11: {}, 22: {}})
    strategy = make_strategy()
    with server_identity():
        messages = strategy.configure_support(1, global_arrays(), ConfigRecord(), grid)
    for message in messages:
        vectors = message.content[str(RecordKey.SUPPORT)][str(ArrayKey.VECTORS)].numpy()
        np.testing.assert_array_equal(vectors, np.ones((4, 3), np.float32))


def test_waiting_for_sites_is_bounded() -> None:
    grid = FakeGrid(honest_app, {11: {}})
    with pytest.raises(NotEnoughSitesError, match="only 1 of the required 2"):
        wait_for_nodes(grid, 2, timeout=0.2, poll_interval=0.05)


def test_site_directory_lets_a_restarted_site_keep_its_name() -> None:
    sites = SiteDirectory()
    sites.learn(1, "site_a")
    sites.learn(2, "site_a")
    assert sites.names == {2: "site_a"}
    assert sites.name_of(1) == "node-1"


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedmedian"])
def test_the_aggregate_keeps_the_dtypes_that_were_sent(name: str) -> None:
    """FedAdam computes in float64; sent on as is, round 2's float32 replies would fail."""
    strategy = make_strategy(name)
    arrays, _ = train_round(strategy, FakeGrid(honest_app, {n: {} for n in NODES}))
    assert {array.numpy().dtype for array in arrays.values()} == {np.dtype(np.float32)}
