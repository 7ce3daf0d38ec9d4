"""The site worker: one process per ``join`` that owns the site's device and decoded data.

Why
---
Flower starts a new ClientApp process for every message, three a round. On a GPU each of
them would create a CUDA context (a forked child cannot inherit one, so the warm launcher
of :mod:`client.commands.join` cannot help), decode the site's cache and copy the model to
the device again. The worker does that once: ``python -m client join`` starts it before the
SuperNode, and every ClientApp forwards its message to it over a Unix socket in the site's
state folder (``state_dir/worker/site.sock``, folder 0700 and socket 0600: only the site's
user can open it; the worker also refuses a peer of another user).

What it changes, and what it does not
-------------------------------------
- The ClientApp still receives and answers every message, with its mods around the
  forward: the error mod (:func:`client.mods.sanitise_errors`) and central-DP clipping see
  exactly what they see in-process. The worker runs the same handler work
  (:data:`client.app.HANDLERS`) on the same records, so the reply is the one the ClientApp
  would have computed; a failure comes back as its fixed reason code alone (the full error
  stays in the worker's log, the site's), and the ClientApp raises it as a
  :class:`~sic_core.errors.SiteError` with that code.
- ``context.state`` travels both ways (the worker never keeps a run's state).
- The worker runs the site's installed code; a ClientApp forwards only when its own app
  bundle's code (``client`` and ``sic_core``, the bundle's files) hashes to the same digest
  (:func:`code_digest`); otherwise, or when no worker answers, it computes in-process, as it
  does when no worker is configured (tests, simulation, ``join --no-worker``).
- The worker stops with ``join``: ``join`` terminates it on exit, and it exits by itself
  when its parent is gone.
- Its config and data are read once: a change to the site's YAML or data takes effect at
  the next ``join`` (as the app approvals already do).

When it is on
-------------
``join --worker/--no-worker``; by default on when the site computes on a GPU and off on a
CPU. The CPU default is measured (BENCHMARKS.md, "A site's messages"; 2-core machine under
heavy load from other jobs): a message forked from the warm launcher spends 2.0 s before
its work (1.8 s of it the project's imports; config, cache and model 0.16 s), and the
federation's round overhead with workers (64-65 s, two runs) was within the spread of the
same federation without them (48-78 s, three runs), because Flower's polling, transport and
its own start of every ClientApp process dominate and remain. On a CPU the worker would
thus save nothing measurable while running the site's installed code instead of the
bundle's; on a GPU it saves a CUDA context and the copies to the device per message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import sys
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, RecordDict

from sic_core.errors import SicfedError, SiteError
from sic_core.wire import ErrorReason, is_error_reason

if TYPE_CHECKING:
    from client.app import Received

__all__ = [
    "WORKER_ENV",
    "code_digest",
    "forward_to_worker",
    "serve",
    "worker_socket_path",
]

log = logging.getLogger(__name__)

#: Environment variable ``join`` sets for its ClientApps: the worker's socket.
WORKER_ENV = "SICFED_SITE_WORKER"
#: The files whose digest a ClientApp and the worker must share (the app bundle's
#: ``client`` and ``sic_core`` files, as ``fab-include`` in pyproject.toml lists them).
CODE_PATTERNS = (
    "sic_core/**/*.py",
    "client/*.py",
    "client/data/*.py",
    "client/privacy/*.py",
    "client/synth/*.py",
)
_HEADER = struct.Struct("!Q")
_ACCEPT_SECONDS = 1.0
_CONNECT_SECONDS = 5.0


@cache
def code_digest() -> str:
    """SHA-256 of this process's ``client`` and ``sic_core`` code (:data:`CODE_PATTERNS`)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted({p for pattern in CODE_PATTERNS for p in root.glob(pattern)}):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def worker_socket_path(state_dir: Path) -> Path:
    """``state_dir/worker/site.sock``: where the site's worker listens."""
    return Path(state_dir) / "worker" / "site.sock"


# ------------------------------------------------------------------ framing
def _pack(records: RecordDict) -> tuple[dict[str, Any], list[bytes]]:
    """A RecordDict as Flower serialises it: its object id and every nested object's bytes."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    objects = {oid: item.deflate() for oid, item in get_all_nested_objects(records).items()}
    ids = sorted(objects)
    return {"id": records.object_id, "objects": [[oid, len(objects[oid])] for oid in ids]}, [
        objects[oid] for oid in ids
    ]


def _unpack(descriptor: dict[str, Any], payload: memoryview, offset: int) -> tuple[RecordDict, int]:
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = {}
    for oid, size in descriptor["objects"]:
        objects[oid] = bytes(payload[offset : offset + size])
        offset += size
    records = inflate_object_from_contents(descriptor["id"], objects)
    if not isinstance(records, RecordDict):
        raise SiteError("site worker: a frame holds no RecordDict", reason="site_worker_error")
    return records, offset


def _send(connection: socket.socket, header: dict[str, Any], blobs: Iterable[bytes]) -> None:
    encoded = json.dumps(header).encode()
    connection.sendall(_HEADER.pack(len(encoded)) + encoded)
    for blob in blobs:
        connection.sendall(blob)


def _receive_exactly(connection: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        count = connection.recv_into(view[received:], size - received)
        if count == 0:
            raise ConnectionError("site worker: the peer closed the connection mid-frame")
        received += count
    return buffer


def _receive(connection: socket.socket) -> tuple[dict[str, Any], memoryview]:
    (length,) = _HEADER.unpack(_receive_exactly(connection, _HEADER.size))
    header = json.loads(_receive_exactly(connection, length))
    size = sum(size for part in header.get("records", {}).values() for _, size in part["objects"])
    return header, memoryview(_receive_exactly(connection, size))


def _frame(header: dict[str, Any], parts: dict[str, RecordDict]) -> tuple[dict, list[bytes]]:
    blobs: list[bytes] = []
    header = {**header, "records": {}}
    for name, records in parts.items():
        descriptor, data = _pack(records)
        header["records"][name] = descriptor
        blobs += data
    return header, blobs


def _records(header: dict[str, Any], payload: memoryview) -> dict[str, RecordDict]:
    offset, found = 0, {}
    for name, descriptor in header["records"].items():
        found[name], offset = _unpack(descriptor, payload, offset)
    return found


# ------------------------------------------------------------------ ClientApp side
def forward_to_worker(
    kind: str, message: Received, context: Context, startup: float
) -> RecordDict | None:
    """The reply's records computed by the site worker, or ``None`` to compute here.

    ``None`` when no worker is configured (:data:`WORKER_ENV` unset), when it does not
    answer, or when it runs other code than this app bundle's. A failure at the worker
    raises :class:`~sic_core.errors.SiteError` with the worker's reason code.
    """
    address = os.environ.get(WORKER_ENV)
    if not address:
        return None
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(_CONNECT_SECONDS)
        connection.connect(address)
    except OSError as error:
        log.warning("site worker at %s does not answer (%s): computing here", address, error)
        return None
    header, blobs = _frame(
        {
            "kind": kind,
            "message_type": message.message_type,
            "startup": startup,
            "code": code_digest(),
            "run_id": context.run_id,
            "node_id": context.node_id,
            "node_config": dict(context.node_config),
            "run_config": dict(context.run_config),
        },
        {"content": message.content, "state": context.state},
    )
    with connection:
        connection.settimeout(None)  # a round's training may take long
        _send(connection, header, blobs)
        answer, payload = _receive(connection)
    if answer.get("status") == "other_code":
        log.warning("the site worker runs other code than this app bundle: computing here")
        return None
    if answer.get("status") != "ok":
        reason = str(answer.get("reason", ""))
        raise SiteError(
            "the site worker failed this message (its log has the error)",
            reason=reason if is_error_reason(reason) else str(ErrorReason.INTERNAL_ERROR),
        )
    found = _records(answer, payload)
    for key in list(context.state.keys()):
        del context.state[key]
    for key, record in found["state"].items():
        context.state[key] = record
    return found["content"]


# ------------------------------------------------------------------ worker side
def _reason(error: BaseException) -> str:
    if isinstance(error, SicfedError) and is_error_reason(str(error.reason)):
        return str(error.reason)
    return str(ErrorReason.INTERNAL_ERROR)


def _answer(request: dict[str, Any], payload: memoryview, site: Any) -> tuple[dict, list[bytes]]:
    """Run one forwarded message; the answer frame (records, or a reason code)."""
    from client.app import HANDLERS, SITE_CONFIG_KEY, Received

    if request.get("code") != code_digest():
        return {"status": "other_code"}, []
    records = _records(request, payload)
    node_config = request["node_config"]
    if node_config.get(SITE_CONFIG_KEY) != site.config_path:
        raise SiteError(
            "site worker: the message is for another site config", reason="site_worker_error"
        )
    context = Context(
        request["run_id"], request["node_id"], node_config, records["state"], request["run_config"]
    )
    handler = HANDLERS[request["kind"]]
    received = Received(records["content"], request["message_type"])
    content = handler(received, context, site, float(request["startup"]))
    return _frame({"status": "ok"}, {"content": content, "state": context.state})


def _peer_is_this_user(connection: socket.socket) -> bool:
    credentials = connection.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
    )
    _, uid, _ = struct.unpack("3i", credentials)
    return uid == os.getuid()


def _listen(path: Path) -> socket.socket:
    """A socket at ``path`` that only this user can open (folder 0700, socket 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(previous)
    path.chmod(0o600)
    server.listen(8)
    server.settimeout(_ACCEPT_SECONDS)
    return server


def serve(site_yaml: Path, path: Path, *, parent: int | None = None) -> None:
    """Load the site once, then answer forwarded messages until ``parent`` exits.

    Parameters
    ----------
    site_yaml
        The site's config (the same path ``join`` gives the SuperNode).
    path
        The socket to listen on (:func:`worker_socket_path`).
    parent
        The process whose end stops the worker (default: this process's parent).
    """
    from client.app import SiteResources

    parent = os.getppid() if parent is None else parent
    started = time.perf_counter()
    site = SiteResources.load(str(Path(site_yaml).resolve()))
    site.data()
    if site.device.type == "cuda":
        import torch

        torch.empty(1, device=site.device)  # the CUDA context, once for the whole join
    server = _listen(path)
    log.info(
        "site worker of %s ready on %s (%.1f s to load the site)",
        site.config.name,
        site.device,
        time.perf_counter() - started,
    )
    try:
        while os.getppid() == parent:
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                if not _peer_is_this_user(connection):
                    log.warning("site worker: refused a connection from another user")
                    continue
                request, payload = _receive(connection)
                try:
                    header, blobs = _answer(request, payload, site)
                except Exception as error:
                    log.exception("site worker: the %s message failed", request.get("kind"))
                    header, blobs = {"status": "failed", "reason": _reason(error)}, []
                _send(connection, header, blobs)
    finally:
        server.close()
        path.unlink(missing_ok=True)


def main() -> None:
    """``python -m client.site_worker SITE_YAML SOCKET``: what ``join`` starts."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s site worker: %(message)s")
    serve(Path(sys.argv[1]), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
