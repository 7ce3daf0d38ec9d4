"""The site's privacy ledger: every mechanism applied, persisted, composed with Opacus' RDP.

The ledger is the single source of truth for a site's privacy spend. Each Flower message is
handled by a fresh process, so no in-memory accountant survives a round: the accountant is
rebuilt from the ledger's whole history every time (one accountant for the site's life),
and the ledger is written atomically (temporary file, fsync, rename) before anything trained
under a mechanism leaves the site. Restarting a site therefore never resets its budget.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from opacus.accountants import RDPAccountant
from opacus.accountants.utils import MAX_SIGMA, get_noise_multiplier

from sic_core.atomic import atomic_write
from sic_core.errors import ConfigError, PrivacyBudgetError

__all__ = ["LEDGER_FILE", "Mechanism", "PrivacyLedger", "epsilon_of", "noise_for_epsilon"]

LEDGER_FILE = "privacy_ledger.json"
LEDGER_FORMAT = "sicfed.privacy_ledger/1"


@dataclass(frozen=True)
class Mechanism:
    """One application of a subsampled Gaussian mechanism.

    Attributes
    ----------
    kind
        ``"dp-sgd"`` (local training) or ``"support"`` (the support release).
    run_id, round
        Federation run and round it served (``run_id`` is Flower's run id as text).
    noise_multiplier
        Noise standard deviation divided by the L2 sensitivity.
    sample_rate
        Poisson sampling probability of each image per step (1.0 for a full-data release).
    steps
        Number of compositions.
    recorded_at
        UTC timestamp (ISO 8601).
    """

    kind: str
    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    recorded_at: str = ""

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ConfigError(
                "noise_multiplier: DP needs a positive noise multiplier, "
                f"got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"sample_rate: expected a value in (0, 1], got {self.sample_rate}")
        if self.steps < 0:
            raise ConfigError(f"steps: expected >= 0, got {self.steps}")


def _epsilon_of_history(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    accountant.history = [entry for entry in history if entry[2] > 0]
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(delta=delta))


def epsilon_of(mechanisms: Sequence[Mechanism], delta: float) -> float:
    """ε(δ) of the composition of ``mechanisms`` with Opacus' RDP accountant (0 if none)."""
    return _epsilon_of_history(
        [(m.noise_multiplier, m.sample_rate, m.steps) for m in mechanisms], delta
    )


def noise_for_epsilon(
    target_epsilon: float,
    *,
    delta: float,
    sample_rate: float,
    steps: int,
    alongside: Sequence[Mechanism] = (),
    tolerance: float = 0.01,
) -> float:
    """Noise multiplier of a subsampled Gaussian mechanism that costs ``target_epsilon``.

    The mechanism (``sample_rate``, ``steps``) is composed with ``alongside`` (e.g. the same
    round's support release) in a fresh RDP accountant, and the returned noise multiplier
    makes that composition cost at most ``target_epsilon`` at ``delta``, and more than
    ``target_epsilon - tolerance``. Without ``alongside`` this is Opacus'
    ``get_noise_multiplier``; with it, the same doubling-then-bisection search.

    Raises
    ------
    ConfigError
        If ``alongside`` alone already costs ``target_epsilon`` or more, or if no noise
        multiplier up to Opacus' bound (``MAX_SIGMA``) reaches the target.
    """
    if not target_epsilon > 0:
        raise ConfigError(f"epsilon_per_round: expected a positive value, got {target_epsilon}")
    fixed = [(m.noise_multiplier, m.sample_rate, m.steps) for m in alongside]
    floor = _epsilon_of_history(fixed, delta)
    if floor >= target_epsilon:
        raise ConfigError(
            f"epsilon_per_round {target_epsilon}: the round's other mechanisms alone cost "
            f"epsilon {floor:.3f} at delta {delta}; raise epsilon_per_round or "
            "support_noise_multiplier"
        )
    if not fixed:
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                    epsilon_tolerance=tolerance,
                )
            )
        except ValueError as error:
            raise ConfigError(f"epsilon_per_round {target_epsilon}: {error}") from None

    def cost(sigma: float) -> float:
        return _epsilon_of_history([(sigma, sample_rate, steps), *fixed], delta)

    low, high, high_cost = 0.0, 10.0, float("inf")
    while high_cost > target_epsilon:
        high *= 2
        if high > MAX_SIGMA:
            raise ConfigError(
                f"epsilon_per_round {target_epsilon}: no noise multiplier up to "
                f"{MAX_SIGMA:g} reaches it"
            )
        high_cost = cost(high)
    while target_epsilon - high_cost > tolerance:
        middle = (low + high) / 2
        middle_cost = cost(middle)
        if middle_cost < target_epsilon:
            high, high_cost = middle, middle_cost
        else:
            low = middle
    return high


class PrivacyLedger:
    """Append-only, atomically persisted list of :class:`Mechanism` s of one site.

    Parameters
    ----------
    path
        The ledger file (``state_dir / "privacy_ledger.json"``); created on first record.
    delta
        Target δ at which ε is reported.
    max_epsilon
        The site's budget; :meth:`check_budget` refuses anything that would exceed it.
    """

    def __init__(self, path: Path, *, delta: float, max_epsilon: float) -> None:
        self.path = Path(path)
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.mechanisms: list[Mechanism] = self._read()

    @classmethod
    def in_state_dir(cls, state_dir: Path, *, delta: float, max_epsilon: float) -> PrivacyLedger:
        return cls(Path(state_dir) / LEDGER_FILE, delta=delta, max_epsilon=max_epsilon)

    def _read(self) -> list[Mechanism]:
        if not self.path.exists():
            return []
        try:
            payload = json.loads(self.path.read_text())
            if payload.get("format") != LEDGER_FORMAT:
                raise ValueError(f"format is not {LEDGER_FORMAT}")
            return [Mechanism(**entry) for entry in payload["mechanisms"]]
        except (ValueError, KeyError, TypeError) as error:
            # A ledger we cannot read must stop training: guessing would reset the budget.
            raise ConfigError(
                f"privacy ledger {self.path} is unreadable ({error}); restore it from backup"
            ) from error

    @property
    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta`."""
        return epsilon_of(self.mechanisms, self.delta)

    def round_epsilon(self, run_id: str, round_: int) -> float:
        """ε(δ) of the mechanisms recorded for one round of one run, on their own."""
        return epsilon_of(
            [m for m in self.mechanisms if m.run_id == run_id and m.round == round_], self.delta
        )

    def epsilon_after(self, planned: list[Mechanism]) -> float:
        """ε the site would reach if ``planned`` were applied now."""
        return epsilon_of([*self.mechanisms, *planned], self.delta)

    def check_budget(self, planned: list[Mechanism]) -> float:
        """Raise :class:`PrivacyBudgetError` if ``planned`` would exceed ``max_epsilon``.

        Returns the ε after ``planned`` otherwise.
        """
        after = self.epsilon_after(planned)
        if after > self.max_epsilon:
            raise PrivacyBudgetError(
                f"privacy budget: this round would reach epsilon {after:.3f} > max_epsilon "
                f"{self.max_epsilon} (spent {self.epsilon:.3f} at delta {self.delta})"
            )
        return after

    def record(self, mechanisms: list[Mechanism]) -> None:
        """Append ``mechanisms`` and persist the whole ledger atomically."""
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        stamped = [
            m if m.recorded_at else Mechanism(**{**asdict(m), "recorded_at": now})
            for m in mechanisms
        ]
        updated = [*self.mechanisms, *stamped]
        self._write(updated)
        self.mechanisms = updated

    def _write(self, mechanisms: list[Mechanism]) -> None:
        payload = {"format": LEDGER_FORMAT, "mechanisms": [asdict(m) for m in mechanisms]}
        encoded = json.dumps(payload, indent=2).encode()
        atomic_write(self.path, lambda stream: stream.write(encoded))
