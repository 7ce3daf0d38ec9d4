"""The SIC federation strategy: a Flower strategy that knows sites, supports and bad replies.

:class:`SicStrategy` is a Flower :class:`~flwr.serverapp.strategy.Strategy`. It delegates
sampling and weight aggregation to a built-in Flower strategy (FedAvg by default; FedProx,
FedAdam, FedMedian, FedTrimmedAvg, Krum or Multi-Krum, see :func:`make_aggregator`) and adds
what SIC and a hospital network need around it:

- bounded waiting for sites (Flower's sampling waits forever for a missing site);
- the global support set attached to every ``train`` and ``evaluate`` message;
- validation of every reply before aggregation (:mod:`server.validation`), then the adaptive
  bound on update norms (:mod:`server.update_bound`);
- attribution of every reply, rejection, error and timeout to a site name;
- replies sorted by site before aggregation, so the aggregate does not depend on arrival
  order;
- the support phase (``query.support``): per-class cluster statistics from every site,
  merged into global support vectors by weighted k-means;
- the calibration phase (``query.calibration``): binned validation margins from every site,
  added up and fitted into one global calibration of the probabilities
  (:mod:`sic_core.calibration`), sent with every ``evaluate`` message.
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from server.messaging import wait_for_nodes
from server.sites import SiteDirectory, site_device_in, site_name_in
from server.update_bound import UpdateNormBound
from server.validation import (
    Rejection,
    check_calibration_reply,
    check_eval_reply,
    check_support_reply,
    check_train_reply,
    report_of,
)
from sic_core.calibration import (
    Calibration,
    MarginHistogram,
    fit_calibration,
    merge_histograms,
)
from sic_core.errors import ConfigError, SicfedError
from sic_core.support import ClusterStatistics, SupportSet, merge_cluster_statistics
from sic_core.wire import ArrayKey, ConfigKey, EvalMetric, QueryName, RecordKey, parse_error

__all__ = [
    "KRUM_STRATEGIES",
    "STRATEGIES",
    "MultiKrumAllButMalicious",
    "Phase",
    "PhaseReport",
    "SicStrategy",
    "SiteOutcome",
    "TooFewSitesError",
    "base_aggregator",
    "make_aggregator",
    "support_record",
    "with_central_dp",
]

log = logging.getLogger(__name__)


class MultiKrumAllButMalicious(MultiKrum):
    """Flower's Multi-Krum averaging the ``n - f`` best-scored of a round's ``n`` updates.

    ``f`` is ``num_malicious_nodes``; ``n - f`` is Multi-Krum's usual choice (Blanchard et
    al., 2017), and ``n`` is only known once the round's replies are in.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Select ``n - f`` updates by Krum score and average them (Flower's Multi-Krum)."""
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


#: Strategy names selectable in the run config (``strategy = "..."``).
STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrumAllButMalicious,
}

#: Aggregators that pick updates by Krum score; they assume ``byzantine-sites`` poisoners.
KRUM_STRATEGIES = ("krum", "multikrum")

#: Aggregators whose result is a (weighted) mean of the updates: the only ones central DP's
#: noise calibration (``sigma * clip / sites``) fits.
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")

SUPPORT_MESSAGE_TYPE = f"{MessageType.QUERY}.{QueryName.SUPPORT}"
CALIBRATION_MESSAGE_TYPE = f"{MessageType.QUERY}.{QueryName.CALIBRATION}"

#: Reason codes for error replies that Flower itself produced (their text is Flower's).
FLOWER_ERRORS: dict[int, str] = {
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "clientapp_load_failed",
    ErrorCode.MESSAGE_UNAVAILABLE: "message_unavailable",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply_unavailable",
    ErrorCode.NODE_UNAVAILABLE: "site_unavailable",
    ErrorCode.CLIENT_APP_CRASHED: "clientapp_crashed",
}


class Phase:
    """Names of the three message phases of a round."""

    TRAIN = "train"
    SUPPORT = "support"
    CALIBRATION = "calibration"
    EVALUATE = "evaluate"


def make_aggregator(
    name: str,
    *,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    min_sites: int = 2,
    proximal_mu: float = 0.01,
    server_lr: float = 0.1,
    trim_beta: float = 0.2,
    byzantine_sites: int = 1,
) -> FedAvg:
    """Build the Flower strategy that samples sites and aggregates weights.

    Parameters
    ----------
    name
        One of :data:`STRATEGIES` (case-insensitive).
    fraction_train, fraction_evaluate
        Share of connected sites sampled for training / evaluation.
    min_sites
        Minimum sites to train, evaluate and to start a round with.
    proximal_mu
        FedProx's proximal weight.
    server_lr
        FedAdam's server learning rate ``eta``.
    trim_beta
        FedTrimmedAvg's cut fraction per tail.
    byzantine_sites
        Krum's and Multi-Krum's assumed number of malicious sites ``f``; their guarantee
        needs ``min_sites >= 2 f + 3`` (``f = 0``: pick the most central updates, no
        guarantee).

    Raises
    ------
    ConfigError
        For an unknown name (with a suggestion) or an invalid parameter.
    """
    key = name.strip().lower()
    if key not in STRATEGIES:
        hint = difflib.get_close_matches(key, list(STRATEGIES), n=1)
        suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"strategy: unknown strategy {name!r}{suggestion} (choose from {', '.join(STRATEGIES)})"
        )
    common = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites,
        "min_available_nodes": min_sites,
    }
    if key == "fedprox":
        return FedProx(**common, proximal_mu=proximal_mu)
    if key == "fedadam":
        return FedAdam(**common, eta=server_lr)
    if key == "fedtrimmedavg":
        if not 0.0 <= trim_beta < 0.5:
            raise ConfigError(f"trim-beta: expected a value in [0, 0.5), got {trim_beta}")
        return FedTrimmedAvg(**common, beta=trim_beta)
    if key in KRUM_STRATEGIES:
        if byzantine_sites < 0:
            raise ConfigError(f"byzantine-sites: expected >= 0, got {byzantine_sites}")
        if byzantine_sites > 0 and min_sites < 2 * byzantine_sites + 3:
            raise ConfigError(
                f"byzantine-sites: {key} with {byzantine_sites} malicious sites needs "
                f"min-sites >= {2 * byzantine_sites + 3} (2 f + 3), got {min_sites}; "
                "lower byzantine-sites or raise min-sites"
            )
        return STRATEGIES[key](**common, num_malicious_nodes=byzantine_sites)
    return STRATEGIES[key](**common)


def with_central_dp(
    aggregator: FedAvg,
    strategy_name: str,
    *,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_sites: int,
) -> DifferentialPrivacyClientSideFixedClipping:
    """Wrap ``aggregator`` in Flower's client-level central DP with client-side clipping.

    Each site clips its model update to ``clipping_norm`` (Flower's ``fixedclipping_mod``,
    applied by sicfed's ``central_dp_clipping`` mod at the site); the server adds Gaussian
    noise of standard deviation ``noise_multiplier * clipping_norm / num_sampled_sites`` to
    the aggregate (Flower's ``DifferentialPrivacyClientSideFixedClipping``). That is
    client-level DP of the model updates (the unit is a whole site), on top of, not instead
    of, the sites' own sample-level DP-SGD; it does not cover the support release or the
    metrics. The noise is calibrated for a uniform mean over ``num_sampled_sites``: with
    FedAvg's example weighting a large site weighs more than ``1 / num_sampled_sites``.

    Raises
    ------
    ConfigError
        If the aggregator is not a mean (``central-dp`` needs fedavg or fedprox) or a value
        is out of range.
    """
    key = strategy_name.strip().lower()
    if key not in CENTRAL_DP_STRATEGIES:
        raise ConfigError(
            f"central-dp: needs strategy {' or '.join(CENTRAL_DP_STRATEGIES)} (its noise is "
            f"calibrated for a mean of the updates), got {strategy_name!r}"
        )
    if noise_multiplier < 0:
        raise ConfigError(f"central-dp-noise: expected >= 0, got {noise_multiplier}")
    if clipping_norm <= 0:
        raise ConfigError(f"central-dp-clip: expected > 0, got {clipping_norm}")
    if num_sampled_sites < 1:
        raise ConfigError(f"min-sites: expected >= 1, got {num_sampled_sites}")
    return DifferentialPrivacyClientSideFixedClipping(
        aggregator,
        noise_multiplier=noise_multiplier,
        clipping_norm=clipping_norm,
        num_sampled_clients=num_sampled_sites,
    )


def base_aggregator(strategy: Strategy) -> FedAvg:
    """The innermost Flower strategy under wrappers such as the central-DP one."""
    inner = strategy
    while not isinstance(inner, FedAvg) and isinstance(getattr(inner, "strategy", None), Strategy):
        inner = inner.strategy
    if not isinstance(inner, FedAvg):
        raise TypeError(f"{type(strategy).__name__} does not wrap a FedAvg-family strategy")
    return inner


def support_record(support: SupportSet) -> ArrayRecord:
    """The ``support`` record: global vectors ``(K, D)`` float32 and labels ``(K,)`` int64."""
    return ArrayRecord(
        {
            str(ArrayKey.VECTORS): Array(support.vectors.detach().float().cpu().numpy()),
            str(ArrayKey.LABELS): Array(support.labels.detach().long().cpu().numpy()),
        }
    )


@dataclass(frozen=True)
class SiteOutcome:
    """What one site did in one phase.

    Attributes
    ----------
    site
        Site pseudonym (``node-<id>`` while a site has not named itself).
    status
        ``ok``, ``rejected`` (reply failed validation), ``failed`` (the site sent an error
        code) or ``timeout`` (no reply before the deadline).
    reason
        Fixed reason code for anything but ``ok``; an ``ok`` train reply whose update the
        adaptive bound shortened has ``update_clipped``.
    metrics
        The site's metrics (``ok`` only).
    report
        The site's round report (accepted ``evaluate`` replies only; redacted unless the
        site shares example images).
    device
        The device the site computed on (``cpu``, ``cuda:0 <GPU model>``; ``ok`` replies
        of sites that name it only, else empty).
    """

    site: str
    status: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None
    device: str = ""


@dataclass(frozen=True)
class PhaseReport:
    """Outcomes of one phase of one round, sorted by site."""

    phase: str
    server_round: int
    outcomes: tuple[SiteOutcome, ...] = ()

    @property
    def ok(self) -> list[SiteOutcome]:
        """Sites whose replies were accepted."""
        return [o for o in self.outcomes if o.status == "ok"]

    @property
    def problems(self) -> list[SiteOutcome]:
        """Sites that were rejected, failed or timed out."""
        return [o for o in self.outcomes if o.status != "ok"]


class TooFewSitesError(SicfedError):
    """Fewer sites than ``min-sites`` were accepted in a phase: the round aggregates nothing.

    ``reason`` is ``no_sites`` when no site's reply was accepted, ``too_few_sites``
    otherwise; :meth:`details` names every site that was left out and why (e.g.
    ``app_not_approved``).
    """

    def __init__(self, report: PhaseReport, required: int) -> None:
        self.report = report
        self.required = required
        self.reason = "no_sites" if not report.ok else "too_few_sites"
        left_out = ", ".join(f"{o.site}: {o.reason}" for o in report.problems) or "none sampled"
        super().__init__(
            f"round {report.server_round}, {report.phase}: {len(report.ok)} of the required "
            f"{required} sites took part ({left_out}); nothing was aggregated"
        )

    def details(self) -> dict[str, Any]:
        """``round``, ``phase``, ``required``, ``accepted`` and ``sites`` (site -> reason)."""
        return {
            "round": self.report.server_round,
            "phase": self.report.phase,
            "required": self.required,
            "accepted": [o.site for o in self.report.ok],
            "sites": {o.site: o.reason for o in self.report.problems},
        }


Checker = Callable[[RecordDict], Rejection | None]


class SicStrategy(Strategy):
    """Flower strategy for SIC: validated, site-attributed, support-aware aggregation.

    Parameters
    ----------
    aggregator
        A Flower strategy (see :func:`make_aggregator`) that samples sites and aggregates the
        accepted weights, possibly wrapped (:func:`with_central_dp`).
    num_classes, n_shot, proj_dim
        Shape of the support set: ``K = num_classes * n_shot`` vectors of ``proj_dim``.
    node_wait
        Seconds to wait for the aggregator's ``min_available_nodes`` before a phase.
    max_update_norm
        Reject train replies whose update is longer than this (``0``: no fixed bound).
    update_bound
        Clips the accepted updates to a multiple of the running median norm
        (``None``: no adaptive bound).
    merge_seed
        Seed of the weighted k-means that merges site centroids.
    sites
        Directory of node ids, site names and sent messages (shared with the exchange).
    public_support_rounds
        First rounds in which the global support set stays the public one it starts with
        (the class anchors) and no support query is sent. DP runs use it for their anchor
        rounds: sites train against the public anchors then, and a DP support release would
        spend privacy on vectors that noise swamps at a few hundred images per site.
    min_accepted
        Fewest accepted replies a phase needs (the run's ``min-sites``): with fewer, the
        phase aggregates nothing and raises :class:`TooFewSitesError`. 0 leaves a phase
        without valid replies unaggregated without raising (tests of single phases).
    """

    def __init__(
        self,
        aggregator: Strategy,
        *,
        num_classes: int,
        n_shot: int,
        proj_dim: int,
        node_wait: float = 120.0,
        max_update_norm: float = 0.0,
        update_bound: UpdateNormBound | None = None,
        merge_seed: int = 0,
        sites: SiteDirectory | None = None,
        public_support_rounds: int = 0,
        min_accepted: int = 0,
    ) -> None:
        self.aggregator = aggregator
        self.min_accepted = min_accepted
        self.public_support_rounds = public_support_rounds
        self.num_classes = num_classes
        self.n_shot = n_shot
        self.proj_dim = proj_dim
        self.node_wait = node_wait
        self.max_update_norm = max_update_norm
        self.update_bound = update_bound
        #: ``site -> (update norm, bound)`` of the updates the last train round clipped.
        self.clipped: dict[str, tuple[float, float]] = {}
        self.merge_seed = merge_seed
        self.sites = sites if sites is not None else SiteDirectory()
        #: Current global support set (set by the support phase).
        self.support: SupportSet | None = None
        #: Current global calibration (set by the calibration phase; ``None`` before it).
        self.calibration: Calibration | None = None
        #: Latest report per phase.
        self.reports: dict[str, PhaseReport] = {}
        self._sent_arrays: ArrayRecord | None = None
        self._expected: dict[str, list[int]] = {}
        self._disconnected: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ configure
    def summary(self) -> None:
        """Log the configuration."""
        log.info(
            "SicStrategy over %s: %d classes x %d supports (dim %d), update-norm bound %s, "
            "clip to %s x running median",
            type(self.aggregator).__name__,
            self.num_classes,
            self.n_shot,
            self.proj_dim,
            self.max_update_norm or "off",
            self.update_bound.factor if self.update_bound else "off",
        )
        self.aggregator.summary()

    def _wait(self, grid: Grid) -> None:
        wait_for_nodes(
            grid, base_aggregator(self.aggregator).min_available_nodes, timeout=self.node_wait
        )

    def _with_support(self, messages: Iterable[Message]) -> list[Message]:
        if self.support is None:
            raise RuntimeError("the strategy has no support set yet (set the initial anchors)")
        record = support_record(self.support)
        messages = list(messages)
        for message in messages:
            message.content[str(RecordKey.SUPPORT)] = record
        return messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites (bounded wait) and send weights, global support and round config."""
        self._wait(grid)
        messages = self._with_support(
            self.aggregator.configure_train(server_round, arrays, config, grid)
        )
        self._sent_arrays = arrays
        self._expected[Phase.TRAIN] = [m.metadata.dst_node_id for m in messages]
        self._note_disconnected(Phase.TRAIN, grid)
        return messages

    def configure_support(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Ask every connected site for cluster statistics under the weights ``arrays``.

        The current global support set travels along: under DP the sites assign their
        embeddings to it instead of clustering locally. In the first
        ``public_support_rounds`` rounds nothing is sent (the support set stays public).
        """
        if 0 < server_round <= self.public_support_rounds:
            log.info("support round %d: the global support set stays public", server_round)
            self._expected[Phase.SUPPORT] = []
            self._disconnected[Phase.SUPPORT] = []
            return []
        return self._query_every_site(
            Phase.SUPPORT, SUPPORT_MESSAGE_TYPE, server_round, arrays, config, grid
        )

    def configure_calibration(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Ask every connected site for its binned validation margins under ``arrays`` and
        the current global support set."""
        return self._query_every_site(
            Phase.CALIBRATION, CALIBRATION_MESSAGE_TYPE, server_round, arrays, config, grid
        )

    def _query_every_site(
        self,
        phase: Phase,
        message_type: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
    ) -> list[Message]:
        """One query message per connected site: ``arrays``, the round's config and the
        current global support set; the sites are expected to reply in ``phase``."""
        self._wait(grid)
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        nodes = sorted(grid.get_node_ids())
        content = RecordDict({str(RecordKey.ARRAYS): arrays, str(RecordKey.CONFIG): config})
        messages = self._with_support(
            Message(content=content, dst_node_id=node, message_type=message_type) for node in nodes
        )
        self._expected[phase] = nodes
        self._note_disconnected(phase, grid)
        return messages

    def aggregate_calibration(
        self, server_round: int, replies: Iterable[Message]
    ) -> Calibration | None:
        """Add up the sites' margin counts and fit the round's global calibration.

        Integer counts, so the sum and the fit do not depend on the order of the replies.
        Returns ``None`` (and keeps the previous calibration) when no site replied validly.
        """
        accepted, _ = self.review(
            Phase.CALIBRATION,
            server_round,
            replies,
            lambda content: check_calibration_reply(content, num_classes=self.num_classes),
        )
        if not accepted:
            log.warning("calibration round %d: no valid reply; keeping the last", server_round)
            return None
        histograms = [
            MarginHistogram(
                torch.from_numpy(
                    reply.content[str(RecordKey.STATS)][str(ArrayKey.MARGIN_COUNTS)].numpy().copy()
                )
            )
            for reply in accepted
        ]
        self.calibration = fit_calibration(merge_histograms(histograms))
        log.info(
            "calibration round %d: slopes %s from %d cases",
            server_round,
            [round(a, 3) for a in self.calibration.slopes],
            self.calibration.cases,
        )
        return self.calibration

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample sites (bounded wait) and send weights, global support, the global
        calibration and round config."""
        self._wait(grid)
        if self.calibration is not None:
            config = ConfigRecord(dict(config))
            config[str(ConfigKey.CALIBRATION)] = json.dumps(self.calibration.to_dict())
        messages = self._with_support(
            self.aggregator.configure_evaluate(server_round, arrays, config, grid)
        )
        self._expected[Phase.EVALUATE] = [m.metadata.dst_node_id for m in messages]
        self._note_disconnected(Phase.EVALUATE, grid)
        return messages

    def _note_disconnected(self, phase: str, grid: Grid) -> None:
        """Remember the sites that took part before but are not connected now.

        Flower samples only connected nodes, so a site that died between rounds would
        otherwise vanish from the round's table instead of counting as failed.
        """
        connected = set(grid.get_node_ids())
        self._disconnected[phase] = sorted(set(self.sites.names) - connected)

    # ------------------------------------------------------------------ review
    def review(
        self, phase: str, server_round: int, replies: Iterable[Message], check: Checker
    ) -> tuple[list[Message], PhaseReport]:
        """Validate and attribute replies; return the accepted ones sorted by site.

        Every reply is attributed to a site through the message it answers; error replies
        keep only their fixed reason code. Absent sites count as failed: a sampled site
        without any reply with reason ``no_reply``, a site that took part before but is no
        longer connected with reason ``not_connected``.
        """
        accepted: list[tuple[str, Message]] = []
        outcomes: list[SiteOutcome] = []
        answered: set[int] = set()
        for reply in replies:
            node = self.sites.node_of(reply)
            if node is None:
                node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                parsed = parse_error(reply.error.reason or "")
                if parsed is None:
                    code, named = FLOWER_ERRORS.get(reply.error.code, "unknown_error"), None
                else:
                    code, named = parsed
                if named is not None:
                    self.sites.learn(node, named)
                site = self.sites.name_of(node)
                log.warning("%s round %d: site %s failed: %s", phase, server_round, site, code)
                outcomes.append(SiteOutcome(site=site, status="failed", reason=code))
                continue
            name = site_name_in(reply)
            if name is not None:
                self.sites.learn(node, name)
            site = self.sites.name_of(node)
            rejection = check(reply.content)
            if rejection is not None:
                log.warning(
                    "%s round %d: rejected the reply of site %s (%s): %s",
                    phase,
                    server_round,
                    site,
                    rejection.reason,
                    rejection.detail,
                )
                outcomes.append(SiteOutcome(site=site, status="rejected", reason=rejection.reason))
                continue
            metrics = reply.content[str(RecordKey.METRICS)]
            outcomes.append(
                SiteOutcome(
                    site=site,
                    status="ok",
                    metrics={key: float(value) for key, value in metrics.items()},
                    report=report_of(reply.content) if phase == Phase.EVALUATE else None,
                    device=site_device_in(reply) or "",
                )
            )
            accepted.append((site, reply))
        for node in self._expected.get(phase, []):
            if node not in answered:
                site = self.sites.name_of(node)
                log.warning("%s round %d: no reply from site %s", phase, server_round, site)
                outcomes.append(SiteOutcome(site=site, status="failed", reason="no_reply"))
        reported = {outcome.site for outcome in outcomes}
        for node in self._disconnected.get(phase, []):
            if node not in self.sites.names:
                continue  # the site came back under a new node id and answered as such
            site = self.sites.name_of(node)
            if site not in reported:
                log.warning("%s round %d: site %s is not connected", phase, server_round, site)
                outcomes.append(SiteOutcome(site=site, status="failed", reason="not_connected"))
        accepted.sort(key=lambda pair: pair[0])
        report = PhaseReport(
            phase=phase,
            server_round=server_round,
            outcomes=tuple(sorted(outcomes, key=lambda o: (o.site, o.status))),
        )
        self.reports[phase] = report
        return [reply for _, reply in accepted], report

    # ------------------------------------------------------------------ aggregate
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, attribute, sort and bound train replies, then aggregate them.

        A reply the adaptive bound shortened stays ``ok`` in the phase report, with the
        reason ``update_clipped``.
        """
        reference = self._sent_arrays
        if reference is None:
            raise RuntimeError("aggregate_train called before configure_train")
        accepted, report = self.review(
            Phase.TRAIN,
            server_round,
            replies,
            lambda content: check_train_reply(
                content, reference, max_update_norm=self.max_update_norm
            ),
        )
        self._require_enough(report)
        if not accepted:
            log.warning(
                "train round %d: no valid reply; the global model is unchanged", server_round
            )
            return None, None
        self._bound_updates(accepted, report, reference)
        arrays, metrics = self.aggregator.aggregate_train(server_round, accepted)
        return _like(arrays, reference), metrics

    def _require_enough(self, report: PhaseReport) -> None:
        if len(report.ok) < self.min_accepted:
            log.error(
                "%s round %d: %d of the required %d sites took part; the run stops",
                report.phase,
                report.server_round,
                len(report.ok),
                self.min_accepted,
            )
            raise TooFewSitesError(report, self.min_accepted)

    def _bound_updates(
        self, accepted: list[Message], report: PhaseReport, reference: ArrayRecord
    ) -> None:
        self.clipped = {}
        if self.update_bound is None:
            return
        key = str(RecordKey.ARRAYS)
        bounded = self.update_bound.apply([reply.content[key] for reply in accepted], reference)
        for reply, update in zip(accepted, bounded, strict=True):
            if update.clipped:
                site = site_name_in(reply) or ""
                log.warning(
                    "train round %d: clipped the update of site %s from norm %.4g to %.4g",
                    report.server_round,
                    site,
                    update.norm,
                    update.bound,
                )
                reply.content[key] = update.arrays
                self.clipped[site] = (update.norm, update.bound)
        self.reports[Phase.TRAIN] = PhaseReport(
            report.phase,
            report.server_round,
            tuple(
                replace(o, reason="update_clipped")
                if o.status == "ok" and o.site in self.clipped
                else o
                for o in report.outcomes
            ),
        )

    def aggregate_support(self, server_round: int, replies: Iterable[Message]) -> SupportSet | None:
        """Merge the sites' cluster statistics into the new global support set.

        Returns ``None`` (and keeps the previous support set) when no site replied validly
        or the round is one of the first ``public_support_rounds``.
        """
        if 0 < server_round <= self.public_support_rounds:
            self.reports[Phase.SUPPORT] = PhaseReport(Phase.SUPPORT, server_round)
            return None
        accepted, report = self.review(
            Phase.SUPPORT,
            server_round,
            replies,
            lambda content: check_support_reply(
                content, num_classes=self.num_classes, n_shot=self.n_shot, dim=self.proj_dim
            ),
        )
        self._require_enough(report)
        if not accepted:
            log.warning("support round %d: no valid reply; keeping the support set", server_round)
            return None
        statistics = []
        for reply in accepted:
            stats = reply.content[str(RecordKey.STATS)]
            statistics.append(
                ClusterStatistics(
                    sums=torch.from_numpy(stats[str(ArrayKey.SUMS)].numpy().copy()),
                    counts=torch.from_numpy(stats[str(ArrayKey.COUNTS)].numpy().copy()),
                )
            )
        support = merge_cluster_statistics(statistics, self.n_shot, seed=self.merge_seed)
        missing = [
            c
            for c in range(self.num_classes)
            if not any(float(s.counts[c].sum()) > 0 for s in statistics)
        ]
        if missing:
            log.warning("support round %d: no site has images of classes %s", server_round, missing)
        self.support = support
        return support

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Validate and attribute evaluation replies; weighted means plus per-site summaries.

        Besides the aggregator's example-weighted means, the record holds
        ``sites.mean-auroc`` and ``sites.min-auroc`` over the sites whose AUROC is defined,
        and ``sites.evaluated``.
        """
        accepted, report = self.review(
            Phase.EVALUATE,
            server_round,
            replies,
            lambda content: check_eval_reply(content, num_classes=self.num_classes),
        )
        self._require_enough(report)
        if not accepted:
            log.warning("evaluate round %d: no valid reply", server_round)
            return None
        metrics = self.aggregator.aggregate_evaluate(server_round, accepted) or MetricRecord()
        aurocs = [
            o.metrics[str(EvalMetric.AUROC)]
            for o in report.ok
            if o.metrics[str(EvalMetric.AUROC_DEFINED)] > 0
        ]
        metrics["sites.evaluated"] = len(report.ok)
        if aurocs:
            metrics["sites.mean-auroc"] = float(np.mean(aurocs))
            metrics["sites.min-auroc"] = float(np.min(aurocs))
        return metrics

    # ------------------------------------------------------------------ state
    def aggregator_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Server-optimiser moments of adaptive aggregators (FedAdam), for checkpoints.

        Tensors, not numpy arrays: a checkpoint must load with ``weights_only=True``.
        """
        state: dict[str, dict[str, torch.Tensor]] = {}
        for name in ("m_t", "v_t"):
            value = getattr(base_aggregator(self.aggregator), name, None)
            if value:
                state[name] = {
                    key: torch.from_numpy(np.array(array)) for key, array in value.items()
                }
        return state


def _like(arrays: ArrayRecord | None, reference: ArrayRecord) -> ArrayRecord | None:
    """``arrays`` in the dtypes of the weights that were sent.

    Flower 1.41's FedAdam computes in float64 under NumPy 2; sent on as float64, every
    site's float32 reply to the next round would fail the reply check (``array_shape``) and
    the global model would never move again.
    """
    if arrays is None:
        return None
    return ArrayRecord(
        {
            key: Array(array.numpy().astype(reference[key].numpy().dtype, copy=False))
            if key in reference
            else array
            for key, array in arrays.items()
        }
    )
