"""Coordinator-side security pieces without a federation: certificates, the site-facing
listener's path filter, the roster, the app hash and the new commands' help."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from client.app_approval import APP_HASH_PATTERN
from server.app_bundle import app_bundle_hash
from server.cli import app
from server.roster import Roster, key_fingerprint, read_public_key
from server.superlink_listeners import SiteFacingOnly
from server.tls import certificate_names
from sic_core.errors import ConfigError

runner = CliRunner()


@pytest.mark.parametrize("command", ["certs", "register-site", "app-hash"])
def test_new_commands_have_help_with_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "python -m server" in result.output


def test_certs_names_the_sans_and_loopback_and_chains_to_the_ca(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["certs", "--home", str(tmp_path), "--san", "10.0.0.5", "--san", "coord.example"]
    )
    assert result.exit_code == 0, result.output
    tls = tmp_path / "tls"
    assert certificate_names(tls / "server.crt") == [
        "10.0.0.5",
        "coord.example",
        "127.0.0.1",
        "localhost",
    ]
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    server.verify_directly_issued_by(ca)
    assert (tls / "server.key").stat().st_mode & 0o077 == 0
    again = runner.invoke(app, ["certs", "--home", str(tmp_path)])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_start_refuses_without_tls_files_and_names_the_certs_command(tmp_path: Path) -> None:
    result = runner.invoke(app, ["start", "--home", str(tmp_path)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert "python -m server certs" in text and "--insecure" in text


def _request(path: str) -> tuple[int, bool]:
    reached: list[str] = []
    sent: list[dict] = []

    async def inner(scope, receive, send) -> None:
        reached.append(scope["path"])

    async def receive() -> dict:
        return {"type": "http.request"}

    async def send(message) -> None:
        sent.append(message)

    asyncio.run(SiteFacingOnly(inner)({"type": "http", "path": path}, receive, send))
    status = sent[0]["status"] if sent else 0
    return status, bool(reached)


@pytest.mark.parametrize(
    ("path", "passed"),
    [
        ("/v1/fleet/pull-messages", True),
        ("/health", True),
        ("/v1/control/list-runs", False),
        ("/v1/runtime/pull-messages", False),
        ("/v1/fleetx", False),
        ("/docs", False),
    ],
)
def test_the_site_listener_passes_only_fleet_and_health(path: str, passed: bool) -> None:
    status, reached = _request(path)
    assert reached is passed
    assert status == (0 if passed else 404)


def test_roster_refuses_a_second_site_with_the_same_name_or_key(tmp_path: Path) -> None:
    from client.site_keys import generate_site_keys

    _, public = generate_site_keys(tmp_path / "a")
    _, other = generate_site_keys(tmp_path / "b")
    roster = Roster(tmp_path / "sites.json")
    fingerprint = key_fingerprint(read_public_key(public))
    assert fingerprint.startswith("SHA256:") and len(fingerprint) == 50
    roster.add("site_a", fingerprint, 7)
    with pytest.raises(ConfigError, match="already registered as site 'site_a'"):
        roster.check_new("site_x", fingerprint)
    with pytest.raises(ConfigError, match="site named 'site_a'"):
        roster.check_new("site_a", key_fingerprint(read_public_key(other)))
    with pytest.raises(ConfigError, match="--name"):
        roster.check_new("bad name", "SHA256:x")
    assert roster.names_by_node() == {7: "site_a"}


def test_register_site_rejects_a_file_that_is_not_an_ecdsa_key(tmp_path: Path) -> None:
    bad = tmp_path / "key.pub"
    bad.write_text("not a key\n")
    result = runner.invoke(
        app,
        ["register-site", "--home", str(tmp_path), "--name", "a", "--public-key", str(bad)],
    )
    assert result.exit_code == 1 and str(bad) in result.output.replace("\n", "")


def test_app_hash_is_stable_and_changes_with_one_line(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2]
    first = app_bundle_hash(tmp_path / "one")
    assert APP_HASH_PATTERN.fullmatch(first)
    assert app_bundle_hash(tmp_path / "two") == first
    copy = tmp_path / "checkout"
    copy.mkdir()
    shutil.copy2(source / "pyproject.toml", copy / "pyproject.toml")
    for package in ("client", "server", "sic_core"):
        shutil.copytree(
            source / package, copy / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    with open(copy / "client" / "app.py", "a") as stream:
        stream.write("# one changed line\n")
    assert app_bundle_hash(tmp_path / "three", source=copy) != first
