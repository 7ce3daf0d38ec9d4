"""Test doubles for in-process federation tests: tiny sites and a fake Flower Grid.

Import as ``from tests.server.fedkit import ...`` (``tests`` is a namespace package).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Node id of the fake SuperLink (as Flower uses for error replies).
SERVER_NODE = SUPERLINK_NODE_ID

#: The app bundle hash the fake SuperLink reports.
FAB_HASH = "f" * 64


def _images(rng: np.random.Generator, label: int, count: int, size: int) -> np.ndarray:
    """Noise images; class 1 has a bright disc (a learnable "lesion") at a random place."""
    images = rng.normal(90, 20, size=(count, size, size))
    yy, xx = np.mgrid[:size, :size]
    if label == 1:
        for image in images:
            cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size / 6) ** 2] += 120
    return np.clip(images, 0, 255).astype(np.uint8)


def write_site(
    root: Path,
    name: str,
    *,
    size: int = 16,
    train_per_class: tuple[int, ...] = (12, 12),
    val_per_class: tuple[int, ...] = (6, 6),
    seed: int = 0,
) -> Path:
    """Write a tiny MedMNIST-format site (``<root>/<name>/site.yaml``) and return its YAML.

    A class with a zero count in ``train_per_class`` is missing at this site.
    """
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per_class in (
        ("train", train_per_class),
        ("val", val_per_class),
        ("test", val_per_class),
    ):
        images = [_images(rng, label, count, size) for label, count in enumerate(per_class)]
        labels = [np.full(count, label) for label, count in enumerate(per_class)]
        arrays[f"{split}_images"] = np.concatenate(images)
        arrays[f"{split}_labels"] = np.concatenate(labels).reshape(-1, 1).astype(np.int64)
    np.savez(folder / "data.npz", **arrays)
    config = {
        "name": name,
        "seed": seed,
        "state_dir": "state",
        "data": {
            "format": "medmnist",
            "npz": "data.npz",
            "class_names": [f"class{c}" for c in range(len(train_per_class))],
            "image_size": size,
        },
        "preprocessing": {"augment": False},
    }
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def server_identity(run_id: int = 1) -> Iterator[None]:
    """Set Flower's task identity so that ``Message(...)`` can be built outside a run."""
    previous = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE
    TaskIdentity.task_id = 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = previous


def wire_copy(message: Message) -> Message:
    """Serialise and deserialise ``message`` the way Flower moves it between processes."""
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    copy = inflate_object_from_contents(message.object_id, objects)
    copy.metadata.__dict__["_message_id"] = message.metadata.message_id
    return copy


Handler = Callable[[Message, Context], Message]


class FakeGrid(Grid):
    """A Grid that delivers each message to an in-process ClientApp, one Context per node.

    Parameters
    ----------
    app
        The ClientApp (or any ``(message, context) -> reply`` callable).
    node_configs
        ``node id -> node_config`` (e.g. ``{"site-config": ".../site.yaml"}``).
    run_config
        The run config every Context gets.
    offline
        Nodes that are connected but never answer (their messages time out).
    tamper
        ``tamper(node_id, reply) -> reply`` applied to a node's replies (e.g. inject NaN).
    """

    def __init__(
        self,
        app: Handler,
        node_configs: dict[int, dict],
        *,
        run_id: int = 1,
        run_config: dict | None = None,
        offline: Iterable[int] = (),
        tamper: Callable[[int, Message], Message] | None = None,
    ) -> None:
        self.app = app
        self.run_id = run_id
        self.contexts = {
            node: Context(run_id, node, dict(config), RecordDict(), dict(run_config or {}))
            for node, config in node_configs.items()
        }
        self.offline = set(offline)
        self.tamper = tamper
        self._replies: dict[str, Message] = {}
        #: Every message as a site received it, and every reply as a site sent it.
        self.delivered: list[tuple[int, Message]] = []
        self.sent_by_sites: list[tuple[int, Message]] = []

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        """The run as the SuperLink describes it; the app bundle's hash is :data:`FAB_HASH`."""
        run = Run.create_empty(self.run_id)
        run.fab_hash = FAB_HASH
        return run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        received = wire_copy(message)
        self.delivered.append((node, received))
        try:
            reply = self.app(received, self.contexts[node])
        except Exception as error:  # what Flower does when a ClientApp raises
            reply = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(error)}:<'{error}'>",
                ),
                reply_to=received,
            )
        if self.tamper is not None:
            reply = self.tamper(node, reply)
        reply.metadata.__dict__["_message_id"] = reply.object_id
        self.sent_by_sites.append((node, reply))
        return wire_copy(reply)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(message.metadata.message_id)
            if message.metadata.dst_node_id not in self.offline:
                self._replies[message.metadata.message_id] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))
