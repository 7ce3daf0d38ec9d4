"""The hash-chained audit log: appends chain, any edited line is named, `audit verify`."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.audit import (
    ENTRY_KEYS,
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    verify_audit_log,
)
from server.cli import app

runner = CliRunner()
EVENTS = (
    (AuditEvent.RUN_SUBMITTED, {"overrides": {"rounds": 2}}),
    (AuditEvent.RUN_STARTED, {"config_hash": "c" * 64, "app_hash": "a" * 64}),
    (AuditEvent.ROUND_COMPLETED, {"round": 1, "participants": {"train": ["site_a"]}}),
    (AuditEvent.ROUND_COMPLETED, {"round": 2, "rejected": [{"site": "site_b"}]}),
    (AuditEvent.RUN_COMPLETED, {"rounds": 2}),
)


def write_log(path: Path) -> list[dict]:
    log = AuditLog(path, 4242)
    return [log.append(event, actor="alice@coordinator", details=d) for event, d in EVENTS]


def test_entries_chain_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    entries = write_log(path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == entries
    assert all(set(entry) == set(ENTRY_KEYS) for entry in lines)
    assert [entry["seq"] for entry in lines] == list(range(len(EVENTS)))
    assert lines[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(lines))
    verdict = verify_audit_log(path)
    assert verdict.ok and verdict.entries == len(EVENTS) and verdict.head == lines[-1]["hash"]


def edit_field(entry: dict) -> None:
    entry["details"]["edited"] = True


def edit_actor(entry: dict) -> None:
    entry["actor"] = "mallory@coordinator"


def rehash_after_edit(entry: dict) -> None:
    """An editor who recomputes the line's own hash still breaks the next line's link."""
    from server.audit import _entry_hash

    entry["time"] = "2000-01-01T00:00:00+00:00"
    entry["hash"] = _entry_hash(entry)


@pytest.mark.parametrize("edit", [edit_field, edit_actor, rehash_after_edit])
@pytest.mark.parametrize("line", range(1, len(EVENTS) + 1))
def test_editing_any_line_names_that_line(tmp_path: Path, line: int, edit) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[line - 1])
    edit(entry)
    lines[line - 1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    verdict = verify_audit_log(path)
    rehashed_last_line = edit is rehash_after_edit and line == len(EVENTS)
    if rehashed_last_line:  # nothing after it to break: only an outside copy of the head helps
        assert verdict.ok
        return
    expected = line + 1 if edit is rehash_after_edit else line
    assert verdict.bad_line == expected
    assert verdict.entries == expected - 1


def test_a_deleted_or_reordered_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    assert verify_audit_log(path).bad_line == 2
    path.write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
    assert verify_audit_log(path).bad_line == 2


def test_audit_verify_command_names_the_first_bad_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "4242"
    write_log(run_dir / "audit.jsonl")
    result = runner.invoke(app, ["audit", "verify", "--home", str(tmp_path), "4242"])
    assert result.exit_code == 0, result.output
    assert f"{len(EVENTS)} entries verify" in result.output
    lines = (run_dir / "audit.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"round":1', '"round":7')
    (run_dir / "audit.jsonl").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["audit", "verify", "--home", str(tmp_path)])  # the newest
    assert result.exit_code == 1
    assert "line 3 does not verify" in " ".join(result.output.split())
    result = runner.invoke(app, ["audit", "verify", "--home", str(tmp_path), "17"])
    assert result.exit_code == 2 and "has no run 17" in " ".join(result.output.split())


@pytest.mark.parametrize("argument", ["runs/4242", "runs/4242/audit.jsonl", "."])
def test_audit_verify_still_takes_the_old_run_folder_with_a_warning(
    tmp_path: Path, argument: str
) -> None:
    write_log(tmp_path / "runs" / "4242" / "audit.jsonl")
    result = runner.invoke(app, ["audit", "verify", str(tmp_path / argument)])
    assert result.exit_code == 0, result.output
    assert f"{len(EVENTS)} entries verify" in result.output
    assert "is deprecated, use audit verify --home HOME RUN_ID" in result.stderr


def test_audit_verify_has_help_with_examples() -> None:
    result = runner.invoke(app, ["audit", "verify", "--help"])
    assert result.exit_code == 0 and "python -m server audit verify" in result.output


def _append_many(path: str, actor: str) -> None:
    log = AuditLog(Path(path), 1)
    for index in range(25):
        log.append(AuditEvent.ROUND_COMPLETED, actor=actor, details={"round": index})


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_append_many, args=(str(path), actor)) for actor in ("cli", "app")
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert all(worker.exitcode == 0 for worker in workers)
    verdict = verify_audit_log(path)
    assert verdict.ok and verdict.entries == 50
