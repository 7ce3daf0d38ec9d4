"""Site-side security without a federation: keys, approvals, the app gate, join's checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from client import app_approval
from client.cli import app
from client.config import load_site_config
from sic_core.errors import ConfigError
from tests.server.fedkit import write_site

runner = CliRunner()

HASH = "sha256:" + "ab" * 32


@pytest.mark.parametrize("command", ["keygen", "approve"])
def test_new_commands_have_help_with_examples(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "python -m client" in result.output


def test_keygen_writes_an_openssh_ecdsa_key_flower_can_load(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    private = tmp_path / "keys" / "site_ecdsa"
    key = load_ssh_private_key(private.read_bytes(), password=None)  # what the SuperNode does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert private.stat().st_mode & 0o077 == 0
    assert (tmp_path / "keys" / "site_ecdsa.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    again = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_approve_adds_the_hash_once_and_keeps_the_header_comment(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_p")
    site.write_text("# hospital P, edited by hand\n" + site.read_text())
    first = runner.invoke(app, ["approve", "--site", str(site), "--app-hash", HASH])
    second = runner.invoke(app, ["approve", "--site", str(site), "--app-hash", HASH])
    assert first.exit_code == 0 and second.exit_code == 0 and "already" in second.output
    assert site.read_text().startswith("# hospital P, edited by hand\n")
    assert load_site_config(site).federation.approved_apps == [HASH]


def test_a_malformed_hash_is_refused_by_approve_and_named_in_the_config(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_q")
    result = runner.invoke(app, ["approve", "--site", str(site), "--app-hash", "sha256:xyz"])
    assert result.exit_code == 2 and "--app-hash" in result.output
    config = yaml.safe_load(site.read_text())
    config["federation"] = {"approved_apps": ["md5:abc"]}
    site.write_text(yaml.safe_dump(config))
    with pytest.raises(
        ConfigError, match=r"federation\.approved_apps: .md5:abc. is not an app hash"
    ):
        load_site_config(site)


def test_join_refuses_a_site_that_approved_no_app(tmp_path: Path) -> None:
    site = write_site(tmp_path, "site_r")
    result = runner.invoke(app, ["join", "--site", str(site), "--insecure", "--no-prepare"])
    text = " ".join(result.output.split())
    assert result.exit_code != 0
    assert "federation.approved_apps is empty" in text and "--allow-any-app" in text


class _FakeRuntime:
    """Stands in for ``flwr.supernode.runtime.run_clientapp``'s two hooks."""

    def __init__(self) -> None:
        self.installed: list[bytes] = []

    def install_from_fab(self, fab: bytes, **_: object) -> str:
        self.installed.append(fab)
        return "installed"

    def get_load_client_app_fn(self, **_: object):
        return lambda *args: "the bundle's ClientApp"


def _gate(monkeypatch: pytest.MonkeyPatch, approved: frozenset[str] | None) -> _FakeRuntime:
    from flwr.supernode.runtime import run_clientapp

    fake = _FakeRuntime()
    monkeypatch.setattr(run_clientapp, "install_from_fab", fake.install_from_fab)
    monkeypatch.setattr(run_clientapp, "get_load_client_app_fn", fake.get_load_client_app_fn)
    app_approval.install_guard(approved, site="site_g")
    return fake


def test_the_gate_neither_installs_nor_loads_an_unapproved_bundle(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from flwr.supernode.runtime import run_clientapp

    fake = _gate(monkeypatch, frozenset({HASH}))
    bundle = b"a bundle nobody approved"
    assert run_clientapp.install_from_fab(bundle, skip_prompt=True) is None
    loaded = run_clientapp.get_load_client_app_fn(default_app_ref="")("id", "1.0", "h")
    assert fake.installed == []
    assert isinstance(loaded, app_approval._Refusal) and loaded.site == "site_g"
    digest = "sha256:" + hashlib.sha256(bundle).hexdigest()
    assert f"app_not_approved: refused app {digest}" in caplog.text


def test_the_gate_passes_an_approved_bundle(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp

    bundle = b"the approved bundle"
    fake = _gate(monkeypatch, frozenset({app_approval.app_hash(bundle)}))
    assert run_clientapp.install_from_fab(bundle) == "installed"
    assert run_clientapp.get_load_client_app_fn()("id", "1.0", "h") == "the bundle's ClientApp"
    assert fake.installed == [bundle]


def test_without_joins_settings_the_gate_approves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.delenv(app_approval.APPROVED_APPS_ENV, raising=False)
    fake = _FakeRuntime()
    monkeypatch.setattr(run_clientapp, "install_from_fab", fake.install_from_fab)
    monkeypatch.setattr(run_clientapp, "get_load_client_app_fn", fake.get_load_client_app_fn)
    app_approval.install_guard_from_environment()
    assert run_clientapp.install_from_fab(b"anything") is None and fake.installed == []
