"""When each site last sent a heartbeat, read from the SuperLink's state database.

Flower lists a SuperNode as online until ``HEARTBEAT_PATIENCE`` (2) heartbeat intervals
after its last heartbeat, and only flips it when someone asks; a killed site therefore looked
connected for 35-80 s. A SuperNode beats every 17.5-22.5 s (30 s interval, minus the 5 s
call timeout, times 0.7-0.9), so a site whose last heartbeat is older than one interval has
missed one: ``status`` shows it as lost, at most about 53 s (under 2 intervals) after it died.

The database is Flower's (``flower-superlink --database``); it is opened read-only.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HEARTBEAT_PATIENCE", "SiteHeartbeat", "read_heartbeats"]

#: Flower 1.41's ``HEARTBEAT_PATIENCE``: a node's ``online_until`` is its last heartbeat
#: plus this many intervals (``flwr.common.constant``; a test checks the value).
HEARTBEAT_PATIENCE = 2

_UINT64 = 1 << 64


@dataclass(frozen=True)
class SiteHeartbeat:
    """A SuperNode's last heartbeat as the SuperLink recorded it.

    Attributes
    ----------
    node_id
        Flower node id (unsigned, as ``flwr supernode list`` shows it).
    seconds_since
        Seconds since its last heartbeat.
    interval
        The heartbeat interval it announced (s).
    """

    node_id: int
    seconds_since: float
    interval: float

    @property
    def lost(self) -> bool:
        """True when the site missed a heartbeat (none for a whole interval)."""
        return self.seconds_since > self.interval


def read_heartbeats(database: Path, *, now: float | None = None) -> dict[int, SiteHeartbeat]:
    """The last heartbeat of every SuperNode the SuperLink holds as online.

    Parameters
    ----------
    database
        The SuperLink's state database (``HOME/superlink/state.db``).
    now
        Current time (``time.time()``), for tests.

    Returns
    -------
    dict[int, SiteHeartbeat]
        By node id; empty when the database does not exist or has no node table yet.
    """
    if not Path(database).is_file():
        return {}
    now = time.time() if now is None else now
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            rows = connection.execute(
                "SELECT node_id, online_until, heartbeat_interval FROM node "
                "WHERE status = 'online' AND online_until IS NOT NULL"
            ).fetchall()
    except sqlite3.OperationalError:
        return {}
    beats = {}
    for signed_id, online_until, interval in rows:
        node_id = int(signed_id) % _UINT64  # stored as a signed 64-bit integer
        last = float(online_until) - HEARTBEAT_PATIENCE * float(interval)
        beats[node_id] = SiteHeartbeat(node_id, now - last, float(interval))
    return beats
