"""Bounded message exchange with the sites.

Flower's ``Grid.send_and_receive`` polls every 3 s and its node sampling waits forever for
missing sites. Here every wait has a deadline and replies are polled at a short interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from server.sites import SiteDirectory
from sic_core.errors import SicfedError

__all__ = ["Exchange", "NotEnoughSitesError", "exchange", "wait_for_nodes"]

log = logging.getLogger(__name__)


class NotEnoughSitesError(SicfedError):
    """Fewer sites than required were connected when the wait ran out."""

    reason = "not_enough_sites"


@dataclass(frozen=True)
class Exchange:
    """What came back from one round of messages.

    Attributes
    ----------
    replies
        Replies (content or error) in arrival order.
    missing
        Node ids that did not reply before the deadline, or whose message could not be
        pushed, sorted.
    """

    replies: list[Message] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


def wait_for_nodes(
    grid: Grid, minimum: int, *, timeout: float, poll_interval: float = 0.5
) -> list[int]:
    """Wait until at least ``minimum`` nodes are connected; return their ids, sorted.

    Raises
    ------
    NotEnoughSitesError
        If fewer than ``minimum`` nodes are connected after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughSitesError(
                f"only {len(nodes)} of the required {minimum} sites connected within "
                f"{timeout:.0f} s"
            )
        if not announced:
            log.info(
                "waiting up to %.0f s for %d sites (%d connected)", timeout, minimum, len(nodes)
            )
            announced = True
        time.sleep(poll_interval)


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    sites: SiteDirectory,
    timeout: float,
    poll_interval: float = 0.2,
) -> Exchange:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` passed.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    messages
        Messages to send (one per node).
    sites
        Directory that records each message's destination (to attribute error replies).
    timeout
        Seconds to wait for replies after pushing.
    poll_interval
        Seconds between two pulls.
    """
    messages = list(messages)
    if not messages:
        return Exchange()
    destinations = [message.metadata.dst_node_id for message in messages]
    message_ids = list(grid.push_messages(messages))
    pending: dict[str, int] = {}
    unsent: list[int] = []
    for message_id, node_id in zip(message_ids, destinations, strict=True):
        if message_id is None:
            unsent.append(node_id)
            continue
        sites.record_sent(message_id, node_id)
        pending[message_id] = node_id
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            if pending.pop(reply.metadata.reply_to_message_id, None) is not None:
                replies.append(reply)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return Exchange(replies=replies, missing=sorted(unsent + list(pending.values())))
