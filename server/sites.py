"""Who is who: Flower node ids, site pseudonyms, and which message went to which node.

Sites name themselves in every reply (``site`` record). Error replies are attributed through
the message they answer: Flower fills an error reply's ``src_node_id`` with the SuperLink's
id, so the directory remembers the destination of every message it sent.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message

from sic_core.wire import SITE_DEVICE_PATTERN, RecordKey, SiteKey

__all__ = ["SiteDirectory", "site_device_in", "site_name_in"]

log = logging.getLogger(__name__)


def site_name_in(reply: Message) -> str | None:
    """The site pseudonym a reply carries, or ``None`` if it has none (or is an error)."""
    if not reply.has_content():
        return None
    record = reply.content.get(str(RecordKey.SITE))
    if not isinstance(record, ConfigRecord):
        return None
    name = record.get(str(SiteKey.NAME))
    return name if isinstance(name, str) and name else None


def site_device_in(reply: Message) -> str | None:
    """The device label a reply carries (``cpu``, ``cuda:0 <GPU model>``), ``None`` if it
    has none or one that is not a device label (nothing else is logged)."""
    if not reply.has_content():
        return None
    record = reply.content.get(str(RecordKey.SITE))
    if not isinstance(record, ConfigRecord):
        return None
    device = record.get(str(SiteKey.DEVICE))
    if not isinstance(device, str) or SITE_DEVICE_PATTERN.fullmatch(device) is None:
        return None
    return device


class SiteDirectory:
    """Maps node ids to site names and sent message ids to node ids."""

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self._names: dict[int, str] = dict(names or {})
        self._destinations: dict[str, int] = {}

    @property
    def names(self) -> dict[int, str]:
        """Known ``node id -> site name`` pairs (a copy)."""
        return dict(self._names)

    def record_sent(self, message_id: str, node_id: int) -> None:
        """Remember that message ``message_id`` went to node ``node_id``."""
        self._destinations[message_id] = node_id

    def node_of(self, reply: Message) -> int | None:
        """The node a reply (or error reply) answers for, from the message it replies to."""
        return self._destinations.get(reply.metadata.reply_to_message_id)

    def learn(self, node_id: int, name: str) -> None:
        """Record that ``node_id`` is site ``name``; a restarted site takes over its name."""
        for other, other_name in list(self._names.items()):
            if other_name == name and other != node_id:
                log.warning("site %s reconnected as node %d (was node %d)", name, node_id, other)
                del self._names[other]
        self._names[node_id] = name

    def name_of(self, node_id: int) -> str:
        """The site name of ``node_id``, or ``node-<id>`` while it has not named itself."""
        return self._names.get(node_id, f"node-{node_id}")
