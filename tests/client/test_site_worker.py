"""The site worker: a real worker process answers forwarded messages as the ClientApp would.

Each test starts ``python -m client.site_worker`` through ``join``'s own starter and stops it
(by its pid) before it ends.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import MessageType

import client.site_worker as worker_module
from client.app import STATE_PROGRESS, app
from client.commands.join import start_site_worker
from client.site_worker import WORKER_ENV, worker_socket_path
from sic_core.wire import RecordKey, SiteKey, parse_error
from tests.client.test_device import SUPPORT_MESSAGE_TYPE, _context, _incoming
from tests.server.fedkit import write_site

pytestmark = pytest.mark.integration

SIZE = 16


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = write_site(tmp_path, "site_w", size=SIZE)
    config = yaml.safe_load(path.read_text())
    config["compute"] = {"device": "cpu"}
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def worker(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[subprocess.Popen, Path]]:
    process, address = start_site_worker(site, site.parent / "state")
    monkeypatch.setenv(WORKER_ENV, str(address))
    try:
        yield process, address
    finally:
        process.terminate()
        process.wait(timeout=30)


def _in_process(site: Path, message_type: str, monkeypatch: pytest.MonkeyPatch):
    with monkeypatch.context() as patched:
        patched.delenv(WORKER_ENV, raising=False)
        return app(_incoming(message_type), _context(site))


def test_the_socket_is_only_for_the_sites_user(worker: tuple, site: Path) -> None:
    _, address = worker
    assert address == worker_socket_path(site.parent / "state").resolve()
    assert stat.S_IMODE(address.stat().st_mode) == 0o600
    assert stat.S_IMODE(address.parent.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(address.stat().st_mode)


def test_forwarded_messages_get_the_replies_computed_in_process(
    worker: tuple, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = _context(site)
    computed = []
    original = worker_module.forward_to_worker

    def counting(*args, **kwargs):
        content = original(*args, **kwargs)
        computed.append(content is not None)
        return content

    monkeypatch.setattr("client.app.forward_to_worker", counting)
    for message_type in (MessageType.TRAIN, SUPPORT_MESSAGE_TYPE, MessageType.EVALUATE):
        forwarded = app(_incoming(message_type), context)
        assert not forwarded.has_error(), forwarded.error
        local = _in_process(site, message_type, monkeypatch)
        assert set(forwarded.content.keys()) == set(local.content.keys())
        assert forwarded.content[str(RecordKey.SITE)][str(SiteKey.NAME)] == "site_w"
        assert forwarded.content[str(RecordKey.SITE)][str(SiteKey.DEVICE)] == "cpu"
        sent, here = (
            forwarded.content[str(RecordKey.METRICS)],
            local.content[str(RecordKey.METRICS)],
        )
        assert set(sent.keys()) == set(here.keys())
        for key in ("num-examples", "train.loss", "val.auroc", "support.classes-present"):
            if key in sent:
                assert sent[key] == pytest.approx(here[key], rel=1e-4), key
        if message_type == MessageType.TRAIN:
            for name, array in forwarded.content[str(RecordKey.ARRAYS)].items():
                expected = local.content[str(RecordKey.ARRAYS)][name].numpy()
                np.testing.assert_allclose(array.numpy(), expected, rtol=1e-4, atol=1e-6)
    # Each forwarded message was answered by the worker; each in-process one computed here.
    assert computed == [True, False] * 3
    # context.state came back from the worker: the ClientApp's memory across rounds.
    assert int(context.state[STATE_PROGRESS]["rounds-trained"]) == 1
    assert int(context.state[STATE_PROGRESS]["last-eval-round"]) == 2


def test_a_failure_at_the_worker_travels_as_its_code_only(
    worker: tuple, site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    message = _incoming(MessageType.TRAIN)
    del message.content[str(RecordKey.SUPPORT)]
    reply = app(message, _context(site))
    assert reply.has_error()
    assert parse_error(reply.error.reason) == ("invalid_message", "site_w")


def test_other_code_or_no_worker_computes_in_process(
    site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(WORKER_ENV, str(tmp_path / "nobody.sock"))
    reply = app(_incoming(MessageType.TRAIN), _context(site))
    assert not reply.has_error(), reply.error  # nothing answers there: computed here
    process, address = start_site_worker(site, site.parent / "state")
    try:
        monkeypatch.setenv(WORKER_ENV, str(address))
        monkeypatch.setattr(worker_module, "code_digest", lambda: "another-bundle")
        asked = []
        original = worker_module._send

        def watched(connection, header, blobs):
            asked.append(header.get("code"))
            return original(connection, header, blobs)

        monkeypatch.setattr(worker_module, "_send", watched)
        reply = app(_incoming(MessageType.TRAIN), _context(site))
        assert not reply.has_error(), reply.error
        assert asked == ["another-bundle"]  # the worker was asked and declined
    finally:
        process.terminate()
        process.wait(timeout=30)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet has exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_worker_stops_with_its_parent(site: Path, tmp_path: Path) -> None:
    address = tmp_path / "w" / "site.sock"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-m', 'client.site_worker', "
            f"{str(site)!r}, {str(address)!r}]); print(child.pid, flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    child = int(parent.stdout.readline())
    try:
        for _ in range(600):
            if address.exists():
                break
            parent.poll()
            time.sleep(0.1)
        assert address.exists()
    finally:
        parent.kill()
        parent.wait(timeout=30)
    for _ in range(300):
        if not _alive(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the worker outlived its parent")
    assert not address.exists()  # it removed its socket on the way out
