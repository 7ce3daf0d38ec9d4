"""One poisoned site out of five: how far each strategy lets it move the global model.

Five sites train from the same global weights; four send honest updates (a shared direction
plus site-specific noise, equal example counts), the fifth sends NaN, arrays of the wrong
shape, its update scaled by 100, or its update sign-flipped. The distance is
``||w_poisoned - w_clean||`` after one round, where ``w_clean`` is the same strategy's result
with the fifth site honest, in units of the median honest update norm. Run with ``-s`` to
print the table the README quotes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from server.app import build_strategy
from server.messaging import exchange
from server.settings import RunSettings
from server.strategy import KRUM_STRATEGIES, STRATEGIES, SicStrategy, make_aggregator
from server.update_bound import UpdateNormBound, update_norm
from sic_core.support import SupportSet
from sic_core.wire import TRAIN_METRIC_KEYS, RecordKey, SiteKey, TrainMetric
from tests.server.fedkit import FakeGrid, server_identity

SHAPES = {"encoder.weight": (16, 8), "encoder.scale": (16,)}
SITES = {11: "site_a", 22: "site_b", 33: "site_c", 44: "site_d", 55: "site_e"}
POISONER = 55
ATTACKS = ("nan", "shape", "scaled_x100", "sign_flip")
CLIP_FACTOR = 3.0


def honest_update(node: int) -> dict[str, np.ndarray]:
    """A shared direction plus site noise of half its size (non-IID sites disagree)."""
    shared = np.random.default_rng(0)
    own = np.random.default_rng(node)
    return {
        key: (shared.normal(0, 0.01, shape) + own.normal(0, 0.005, shape)).astype(np.float32)
        for key, shape in SHAPES.items()
    }


def poisoned_update(attack: str) -> dict[str, np.ndarray]:
    update = honest_update(POISONER)
    if attack == "nan":
        update["encoder.weight"][0, 0] = np.nan
    elif attack == "shape":
        update["encoder.scale"] = np.zeros(17, np.float32)
    elif attack == "scaled_x100":
        update = {key: 100 * value for key, value in update.items()}
    elif attack == "sign_flip":
        update = {key: -value for key, value in update.items()}
    return update


def site_app(attack: str | None):
    def app(message: Message, context: Context) -> Message:
        node = context.node_id
        update = poisoned_update(attack) if node == POISONER and attack else honest_update(node)
        sent = message.content[str(RecordKey.ARRAYS)]
        weights = {
            key: Array(
                update[key] if update[key].shape != SHAPES[key] else sent[key].numpy() + update[key]
            )
            for key in SHAPES
        }
        metrics = {key: 0.0 for key in TRAIN_METRIC_KEYS} | {str(TrainMetric.NUM_EXAMPLES): 100}
        return Message(
            RecordDict(
                {
                    str(RecordKey.ARRAYS): ArrayRecord(weights),
                    str(RecordKey.METRICS): MetricRecord(metrics),
                    str(RecordKey.SITE): ConfigRecord({str(SiteKey.NAME): SITES[node]}),
                }
            ),
            reply_to=message,
        )

    return app


def global_weights() -> ArrayRecord:
    rng = np.random.default_rng(1)
    return ArrayRecord(
        {key: Array(rng.normal(0, 0.1, shape).astype(np.float32)) for key, shape in SHAPES.items()}
    )


def one_round(name: str, attack: str | None, clip_factor: float) -> tuple[ArrayRecord, SicStrategy]:
    """One train round of strategy ``name`` with the fifth site honest or poisoned."""
    options = {"byzantine_sites": 1} if name in KRUM_STRATEGIES else {}
    strategy = SicStrategy(
        make_aggregator(name, min_sites=5, **options),
        num_classes=2,
        n_shot=1,
        proj_dim=3,
        node_wait=1.0,
        update_bound=UpdateNormBound(clip_factor) if clip_factor else None,
    )
    strategy.support = SupportSet(
        vectors=torch.ones(2, 3), labels=torch.tensor([0, 1]), indices=torch.full((2,), -1)
    )
    grid = FakeGrid(site_app(attack), {node: {} for node in SITES})
    with server_identity():
        messages = strategy.configure_train(1, global_weights(), ConfigRecord(), grid)
        result = exchange(grid, list(messages), sites=strategy.sites, timeout=1.0)
        arrays, _ = strategy.aggregate_train(1, result.replies)
    assert arrays is not None
    return arrays, strategy


def median_honest_norm() -> float:
    start = global_weights()
    norms = [
        update_norm(
            ArrayRecord({k: Array(start[k].numpy() + v) for k, v in honest_update(node).items()}),
            start,
        )
        for node in SITES
    ]
    return float(np.median(norms))


def distance(name: str, attack: str, clip_factor: float = CLIP_FACTOR) -> float:
    """How far the poisoner moves the global model, in median honest update norms."""
    clean, _ = one_round(name, None, clip_factor)
    poisoned, _ = one_round(name, attack, clip_factor)
    return update_norm(poisoned, clean) / median_honest_norm()


@pytest.mark.parametrize("attack", ["nan", "shape"])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_nan_and_wrong_shapes_are_always_rejected(name: str, attack: str) -> None:
    _, strategy = one_round(name, attack, CLIP_FACTOR)
    problems = strategy.reports["train"].problems
    assert [(o.site, o.status) for o in problems] == [("site_e", "rejected")]
    assert problems[0].reason == {"nan": "non_finite", "shape": "array_shape"}[attack]


def test_a_scaled_update_is_clipped_by_default_and_fedavg_moves_little() -> None:
    _, strategy = one_round("fedavg", "scaled_x100", CLIP_FACTOR)
    assert [(o.site, o.reason) for o in strategy.reports["train"].ok if o.reason] == [
        ("site_e", "update_clipped")
    ]
    norm, bound = strategy.clipped["site_e"]
    assert norm > 50 * median_honest_norm()
    assert bound <= CLIP_FACTOR * median_honest_norm() * 1.001
    # FedAvg of five equal sites: the poisoner's clipped update (<= bound) replaces an honest
    # one (~1 median norm), each weighted 1/5.
    assert distance("fedavg", "scaled_x100") <= (CLIP_FACTOR + 1.2) / 5
    # Without the bound the same site moves FedAvg about 99/5 honest updates away.
    assert distance("fedavg", "scaled_x100", clip_factor=0) > 15


def test_the_bound_leaves_an_honest_round_alone() -> None:
    _, strategy = one_round("fedavg", None, CLIP_FACTOR)
    assert strategy.clipped == {}


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
@pytest.mark.parametrize("attack", ["scaled_x100", "sign_flip"])
def test_robust_aggregators_keep_the_poisoner_within_a_fraction_of_an_update(
    name: str, attack: str
) -> None:
    assert distance(name, attack) <= 0.5


def test_distance_table() -> None:
    """Every strategy against every attack (printed with ``-s``); a sign flip moves a mean."""
    table = {name: {attack: distance(name, attack) for attack in ATTACKS} for name in STRATEGIES}
    table["fedavg, no bound"] = {a: distance("fedavg", a, clip_factor=0) for a in ATTACKS}
    print("\n| strategy | " + " | ".join(ATTACKS) + " |")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[a]:.3f}" for a in ATTACKS) + " |")
    # Rejected replies: the result is the four honest sites' aggregate, whatever the attack.
    for name in STRATEGIES:
        assert table[name]["nan"] == pytest.approx(table[name]["shape"], abs=1e-6)
    # Mean aggregators follow a flipped honest-norm update: -u instead of u, weighted 1/5.
    assert 0.2 < table["fedavg"]["sign_flip"] <= 2 * 1.2 / 5


def test_the_bound_is_on_by_default_and_off_under_central_dp() -> None:
    default = build_strategy(RunSettings.from_run_config({}))
    assert default.update_bound is not None and default.update_bound.factor == CLIP_FACTOR
    central = build_strategy(RunSettings.from_run_config({"central-dp": True}))
    assert central.update_bound is None
    off = build_strategy(RunSettings.from_run_config({"update-clip-factor": 0}))
    assert off.update_bound is None
