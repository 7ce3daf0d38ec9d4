"""The tamper-evident audit log of a federation run: ``runs/<run id>/audit.jsonl``.

Append-only, one JSON object per line, each chained to the line before by its hash::

    {"seq": 0, "time": "2025-05-01T09:30:12+00:00", "event": "run_submitted",
     "actor": "alice@coordinator", "run_id": "4242", "details": {...},
     "prev_hash": "000...000", "hash": "<sha256>"}

``hash`` is the SHA-256 of the entry without ``hash``, serialised as canonical JSON (keys
sorted, no spaces, UTF-8); ``prev_hash`` is the previous line's ``hash`` (64 zeros on the
first line); ``seq`` counts lines from 0. Editing, inserting or deleting a line breaks the
chain at that line (:func:`verify_audit_log`). Dropping lines from the *end* leaves a valid
shorter chain: compare the head hash that ``audit verify`` prints with one recorded elsewhere.

Several processes append to one log (``server run`` and the ServerApp), so every append
holds an exclusive ``flock`` while it reads the last line and writes its own, then fsyncs.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

__all__ = [
    "ENTRY_KEYS",
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "AuditVerdict",
    "actor_here",
    "arrays_sha256",
    "file_sha256",
    "json_sha256",
    "verify_audit_log",
]

#: ``prev_hash`` of the first line.
GENESIS_HASH = "0" * 64

#: The keys of every entry, a stable contract (README, "Audit log").
ENTRY_KEYS = ("seq", "time", "event", "actor", "run_id", "details", "prev_hash", "hash")


class AuditEvent(StrEnum):
    """What an entry records (the ``event`` key); its ``details`` are listed per event."""

    #: ``server run`` submitted the run: ``overrides`` (the run-config overrides).
    RUN_SUBMITTED = "run_submitted"
    #: The ServerApp started: ``config_hash``, ``app_hash``, ``strategy``, ``rounds``,
    #: ``initial_weights``, ``initial_weights_sha256``.
    RUN_STARTED = "run_started"
    #: A round ended: ``round``, ``participants``, ``rejected``, ``clipped``, ``dp_epsilon``,
    #: ``model_hash``, ``checkpoint``, ``checkpoint_sha256``.
    ROUND_COMPLETED = "round_completed"
    #: The ServerApp finished every round: ``rounds``.
    RUN_COMPLETED = "run_completed"
    #: The ServerApp failed: ``reason``.
    RUN_FAILED = "run_failed"
    #: ``server run`` stopped the run: ``reason``.
    RUN_STOPPED = "run_stopped"
    #: ``server resume`` continued the run: ``from_round``, ``checkpoint_sha256``.
    RUN_RESUMED = "run_resumed"


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def json_sha256(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (e.g. the run config: the config hash)."""
    return hashlib.sha256(_canonical(value)).hexdigest()


def arrays_sha256(arrays: ArrayRecord) -> str:
    """SHA-256 over every array's name, dtype, shape and bytes, in name order (model hash)."""
    digest = hashlib.sha256()
    for key in sorted(arrays.keys()):
        value = np.ascontiguousarray(arrays[key].numpy())
        digest.update(_canonical([key, value.dtype.str, list(value.shape)]))
        digest.update(value.tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def actor_here(role: str | None = None) -> str:
    """``user@host`` of this process, or ``role@host`` for a service (``serverapp``)."""
    try:
        user = role or getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


class AuditLog:
    """Appends hash-chained entries to one run's ``audit.jsonl``.

    Parameters
    ----------
    path
        The log file (:attr:`server.checkpoint.RunFiles.audit_path`).
    run_id
        Flower's run id, stored in every entry.
    """

    def __init__(self, path: Path, run_id: int | str) -> None:
        self.path = Path(path)
        self.run_id = str(run_id)

    def append(self, event: AuditEvent, *, actor: str, details: dict[str, Any]) -> dict[str, Any]:
        """Append one entry chained to the current last line; return it.

        ``details`` must be JSON data without NaN or infinity.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as stream:
            fcntl.flock(stream, fcntl.LOCK_EX)
            try:
                stream.seek(0)
                lines = stream.read().splitlines()
                last = json.loads(lines[-1]) if lines else None
                entry: dict[str, Any] = {
                    "seq": len(lines),
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "event": str(event),
                    "actor": actor,
                    "run_id": self.run_id,
                    "details": details,
                    "prev_hash": last["hash"] if last else GENESIS_HASH,
                }
                entry["hash"] = _entry_hash(entry)
                stream.write(_canonical(entry) + b"\n")
                stream.flush()
                os.fsync(stream.fileno())
            finally:
                fcntl.flock(stream, fcntl.LOCK_UN)
        return entry


@dataclass(frozen=True)
class AuditVerdict:
    """The result of :func:`verify_audit_log`.

    Attributes
    ----------
    entries
        Lines that verified.
    head
        ``hash`` of the last line that verified (:data:`GENESIS_HASH` if none).
    bad_line
        1-based number of the first line that does not verify (``None``: all do).
    problem
        Why that line does not verify.
    """

    entries: int
    head: str
    bad_line: int | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        """Whether every line verified."""
        return self.bad_line is None


def verify_audit_log(path: Path) -> AuditVerdict:
    """Check every line's keys, sequence number, link to the previous line and own hash.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    """
    head = GENESIS_HASH
    with open(path, "rb") as stream:
        lines = stream.read().splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            return AuditVerdict(number - 1, head, number, "not valid JSON")
        if not isinstance(entry, dict) or set(entry) != set(ENTRY_KEYS):
            return AuditVerdict(number - 1, head, number, f"keys differ from {list(ENTRY_KEYS)}")
        if entry["seq"] != number - 1:
            return AuditVerdict(
                number - 1, head, number, f"seq {entry['seq']!r}, expected {number - 1}"
            )
        if entry["prev_hash"] != head:
            return AuditVerdict(
                number - 1, head, number, "prev_hash does not match the previous line's hash"
            )
        try:
            expected = _entry_hash(entry)
        except ValueError:  # NaN or infinity edited in: never written by append
            expected = ""
        if entry["hash"] != expected:
            return AuditVerdict(number - 1, head, number, "hash does not match the entry")
        head = entry["hash"]
    return AuditVerdict(len(lines), head)
