"""The adaptive bound on update norms: clip each site's update to k x the running median.

A site's *update* is ``w_site - w_global`` over the floating-point arrays it sends. A site
that scales its update by 100 (or sends a huge one by mistake) would move a mean-based
aggregate 20-fold further than an honest site can, with five sites. No fixed bound fits
every model, learning rate and round, so the bound follows the federation itself:

    bound = factor x lower median of (accepted norms of the last ``window`` rounds
                                      + this round's norms)

and every update longer than ``bound`` is scaled down to it (the direction is kept; Flower's
``compute_clip_model_update``, the one its DP strategies use). The *lower* median (the
middle value, or the smaller of the two middle values) means that with two sites the larger
update never sets its own bound. The norms a round adds to the history are the clipped ones,
so a site that keeps sending long updates cannot drag the median up; as long as fewer than
half of the norms are a poisoner's, the median stays an honest site's norm.

A sign-flipped update has an honest norm and passes any norm bound: only robust aggregators
(FedMedian, FedTrimmedAvg, Krum, Multi-Krum) reduce its effect.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

__all__ = ["BoundedUpdate", "UpdateNormBound", "update_norm"]

#: Rounds of accepted update norms the running median looks back over.
DEFAULT_WINDOW = 5


def _floating_keys(reference: ArrayRecord) -> list[str]:
    return [
        key for key, array in reference.items() if np.issubdtype(array.numpy().dtype, np.floating)
    ]


def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """Global L2 norm of ``update - reference`` over the floating-point arrays."""
    keys = _floating_keys(reference)
    return get_norm(
        [
            update[key].numpy().astype(np.float64) - reference[key].numpy().astype(np.float64)
            for key in keys
        ]
    )


@dataclass(frozen=True)
class BoundedUpdate:
    """One site's weights after the bound.

    Attributes
    ----------
    arrays
        The weights to aggregate (the original record when not clipped).
    norm
        The update norm as sent.
    bound
        The bound of this round.
    """

    arrays: ArrayRecord
    norm: float
    bound: float

    @property
    def clipped(self) -> bool:
        """Whether the update was scaled down to the bound."""
        return self.norm > self.bound


class UpdateNormBound:
    """Clips updates to ``factor`` x the running lower median of accepted update norms.

    Parameters
    ----------
    factor
        Multiple of the running median an update may reach (> 0).
    window
        Rounds of history the median covers.
    history
        Accepted (clipped) norms of earlier rounds, oldest first (from a checkpoint).
    """

    def __init__(
        self,
        factor: float,
        *,
        window: int = DEFAULT_WINDOW,
        history: Iterable[Sequence[float]] = (),
    ) -> None:
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor
        self._history: deque[list[float]] = deque(
            ([float(n) for n in norms] for norms in history), maxlen=window
        )

    @property
    def history(self) -> list[list[float]]:
        """Accepted norms per round, oldest first (what a checkpoint stores)."""
        return [list(norms) for norms in self._history]

    def bound_for(self, norms: Sequence[float]) -> float:
        """The bound for a round whose updates have ``norms``."""
        pool = sorted([n for round_norms in self._history for n in round_norms] + list(norms))
        return self.factor * pool[(len(pool) - 1) // 2]

    def apply(self, updates: Sequence[ArrayRecord], reference: ArrayRecord) -> list[BoundedUpdate]:
        """Bound one round's updates (trained from ``reference``) and remember their norms.

        Parameters
        ----------
        updates
            The round's validated weights (same names, shapes and dtypes as ``reference``).
        reference
            The global weights the sites trained from.
        """
        if not updates:
            return []
        norms = [update_norm(update, reference) for update in updates]
        bound = self.bound_for(norms)
        keys = _floating_keys(reference)
        origin = [reference[key].numpy() for key in keys]
        results = []
        for update, norm in zip(updates, norms, strict=True):
            arrays = update
            if norm > bound:
                weights = [update[key].numpy().copy() for key in keys]
                compute_clip_model_update(weights, origin, bound)
                clipped = dict(update.items())
                for key, value in zip(keys, weights, strict=True):
                    clipped[key] = Array(np.asarray(value, dtype=update[key].numpy().dtype))
                arrays = ArrayRecord(clipped)
            results.append(BoundedUpdate(arrays=arrays, norm=norm, bound=bound))
        self._history.append([min(norm, bound) for norm in norms])
        return results
