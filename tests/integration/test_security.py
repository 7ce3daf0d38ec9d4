"""Security on loopback: a coordinator from ``python -m server start`` (TLS and site auth on).

- The Control API does not answer on the address printed for sites: the stock ``flwr ls``,
  ``stop``, ``run`` and ``supernode register`` fail there from a fresh ``FLWR_HOME``, with and
  without the CA certificate; through the coordinator's own connection they work.
- A site without a key, with an unregistered key, with the wrong CA or without TLS gets a
  one-line error naming the cause, in under 30 s; a registered site joins.
- A bundle with one changed line is refused at every site (warm and cold ClientApp start)
  with ``app_not_approved`` and writes nothing; the approved bundle runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.app_bundle import bundle_hash
from server.coordinator import Coordinator, free_port
from server.flower_cli import connected_nodes
from server.processes import ProcessGroup, flower_env, stop_pid_group, venv_bin
from server.roster import Roster
from server.tls import create_certificates
from tests.server.fedkit import write_site

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probeapp"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "sicfed-tests"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "probe_client:app"

[tool.flwr.app.config]
outcome = ""
"""

#: The ClientApp leaves a file beside the site's config: proof that the bundle ran there.
PROBE_CLIENT = """\
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg, context):
    site_yaml = Path(str(context.node_config["site-config"]))
    (site_yaml.parent / "bundle-ran").write_text("{variant}")
    return Message(RecordDict({{"result": ConfigRecord({{"ok": 1}})}}), reply_to=msg)
"""

#: The ServerApp asks every connected site once and writes each reply's outcome.
PROBE_SERVER = """\
from pathlib import Path

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    messages = [
        Message(RecordDict({"c": ConfigRecord({})}), dst_node_id=node,
                message_type=MessageType.QUERY)
        for node in grid.get_node_ids()
    ]
    replies = grid.send_and_receive(messages, timeout=120)
    outcomes = sorted(r.error.reason if r.has_error() else "ok" for r in replies)
    Path(str(context.run_config["outcome"])).write_text("\\n".join(outcomes))
"""

SITES = ("site_a", "site_b")


def probe_app(folder: Path, variant: str) -> Path:
    """A tiny Flower app; ``variant`` changes one line of its ClientApp."""
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (folder / "probe_client.py").write_text(PROBE_CLIENT.format(variant=variant))
    (folder / "probe_server.py").write_text(PROBE_SERVER)
    return folder


def python_m(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=flower_env(None),
        check=False,
    )


def flwr(flwr_home: Path, *args: str) -> dict:
    """Run the stock ``flwr`` CLI with ``--format json``; return its JSON answer."""
    completed = subprocess.run(
        [str(venv_bin() / "flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=flower_env(flwr_home),
        check=False,
    )
    text = completed.stdout
    payload = json.loads(text[text.find("{") :]) if "{" in text else {}
    return {"returncode": completed.returncode, **payload}


@dataclass
class Deployment:
    root: Path
    coordinator: Coordinator
    site_address: str
    approved: Path
    changed: Path
    sites: dict[str, Path]
    keys: dict[str, Path]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("security")
    home = root / "coordinator"
    certs = python_m("server", "certs", "--home", str(home), "--san", "127.0.0.1")
    assert certs.returncode == 0, certs.stdout + certs.stderr
    port = free_port(8000)
    started = python_m(
        "server",
        "start",
        "--home",
        str(home),
        "--port",
        str(port),
        "--control-port",
        str(free_port(port + 1)),
        "--mlflow-port",
        str(free_port(5000)),
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        join_line = next(
            line for line in started.stdout.splitlines() if line.startswith("python -m client")
        )
        site_address = join_line.split("--superlink ")[1].split()[0]
        assert "--root-certificates" in join_line and "--auth-key" in join_line
        approved = probe_app(root / "approved" / "probeapp", "approved")
        changed = probe_app(root / "changed" / "probeapp", "changed")
        sites, keys = {}, {}
        for name in SITES:
            sites[name] = write_site(root / "sites", name)
            keygen = python_m("client", "keygen", "--out", str(root / "keys" / name))
            assert keygen.returncode == 0, keygen.stdout + keygen.stderr
            keys[name] = root / "keys" / name / "site_ecdsa"
            approve = python_m(
                "client", "approve", "--site", str(sites[name]), "--app-hash", bundle_hash(approved)
            )
            assert approve.returncode == 0, approve.stdout + approve.stderr
        yield Deployment(root, Coordinator(home), site_address, approved, changed, sites, keys)
    finally:
        python_m("server", "stop", "--home", str(home))


def _fresh_flwr_home(folder: Path, address: str, ca: Path | None) -> Path:
    folder.mkdir(parents=True)
    trust = f'root-certificates = "{ca}"' if ca else "insecure = true"
    (folder / "config.toml").write_text(f'[superlink.x]\naddress = "{address}"\n{trust}\n')
    return folder


def test_the_control_api_is_refused_at_the_address_printed_for_sites(
    deployment: Deployment,
) -> None:
    public_key = deployment.root / "keys" / "site_a" / "site_ecdsa.pub"
    for label, ca in (("with-ca", deployment.coordinator.tls.ca_cert), ("no-ca", None)):
        home = _fresh_flwr_home(deployment.root / f"outsider-{label}", deployment.site_address, ca)
        for command in (
            ["ls", "x"],
            ["stop", "1", "x"],
            ["run", str(deployment.changed), "x"],
            ["supernode", "register", str(public_key), "x"],
        ):
            answer = flwr(home, *command)
            assert answer.get("success") is not True, (label, command, answer)
    # The coordinator's own connection (loopback Control API) works.
    assert flwr(deployment.coordinator.flwr_home, "ls", "sicfed")["success"] is True


def _join(site: Path, address: str, port: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "client",
        "join",
        "--site",
        str(site),
        "--superlink",
        address,
        "--local-port",
        str(port),
        "--no-prepare",
        "--cold",
        *extra,
    ]


def test_a_site_without_the_right_key_or_tls_gets_a_named_error_quickly(
    deployment: Deployment,
) -> None:
    other_ca = create_certificates(deployment.root / "other-ca", ["127.0.0.1"]).ca_cert
    stranger = python_m("client", "keygen", "--out", str(deployment.root / "keys" / "stranger"))
    assert stranger.returncode == 0
    ca = str(deployment.coordinator.tls.ca_cert)
    site = deployment.sites["site_a"]
    cases = {
        "site_key_missing": ["--root-certificates", ca],
        "site_not_registered": [
            "--root-certificates",
            ca,
            "--auth-key",
            str(deployment.root / "keys" / "stranger" / "site_ecdsa"),
        ],
        "is not signed by the CA": ["--root-certificates", str(other_ca)],
        "uses TLS but this site joined with --insecure": ["--insecure"],
    }
    logs = {expected: deployment.root / f"join-{index}.log" for index, expected in enumerate(cases)}
    started = time.monotonic()
    processes = {
        expected: subprocess.Popen(
            _join(
                site,
                deployment.site_address,
                free_port(9300 + index),
                "--flwr-home",
                str(deployment.root / f"flwr-home-{index}"),
                *extra,
            ),
            stdout=logs[expected].open("w"),
            stderr=subprocess.STDOUT,
            env=flower_env(None),
            start_new_session=True,
        )
        for index, (expected, extra) in enumerate(cases.items())
    }
    try:
        for expected, process in processes.items():
            process.wait(timeout=60)
            seconds = time.monotonic() - started
            output = logs[expected].read_text(errors="replace")
            assert process.returncode != 0, (expected, output)
            error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
            assert len(error_lines) == 1 and expected in error_lines[0], (expected, output)
            assert seconds < 30, (expected, seconds)
    finally:
        for process in processes.values():
            if process.poll() is None:
                stop_pid_group(process.pid)
                process.wait()


def _wait_for(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert path.exists(), f"{path} never appeared"
    return path.read_text()


def test_only_the_approved_bundle_runs_at_the_registered_sites(deployment: Deployment) -> None:
    coordinator = deployment.coordinator
    ca = str(coordinator.tls.ca_cert)
    with ProcessGroup() as group:
        for index, name in enumerate(SITES):
            register = python_m(
                "server",
                "register-site",
                "--home",
                str(coordinator.home),
                "--name",
                name,
                "--public-key",
                str(deployment.keys[name]) + ".pub",
            )
            assert register.returncode == 0, register.stdout + register.stderr
            argv = _join(
                deployment.sites[name],
                deployment.site_address,
                free_port(9400 + index),
                "--root-certificates",
                ca,
                "--auth-key",
                str(deployment.keys[name]),
            )
            if name == "site_a":
                argv[argv.index("--cold")] = "--warm"  # the warm launcher's forks are gated too
            group.start(
                name,
                argv,
                log_path=deployment.root / "logs" / f"{name}.log",
                env=flower_env(None),
            )
        deadline = time.monotonic() + 120
        while len(connected_nodes(coordinator.flwr_home)) < len(SITES):
            group.check_alive()
            assert time.monotonic() < deadline, "the registered sites did not connect"
            time.sleep(1)
        roster = Roster(coordinator.roster_file).names_by_node()
        online = {int(node["node-id"]) for node in connected_nodes(coordinator.flwr_home)}
        assert {roster[node] for node in online} == set(SITES)
        status = python_m("server", "status", "--home", str(coordinator.home))
        assert status.stdout.count("connected") >= len(SITES), status.stdout

        for variant, app in (("changed", deployment.changed), ("approved", deployment.approved)):
            outcome = deployment.root / f"outcome-{variant}.txt"
            submitted = flwr(
                coordinator.flwr_home,
                "run",
                str(app),
                "sicfed",
                "--run-config",
                f'outcome="{outcome}"',
            )
            assert submitted["success"] is True, submitted
            replies = _wait_for(outcome, timeout=240).splitlines()
            markers = [path.parent / "bundle-ran" for path in deployment.sites.values()]
            if variant == "changed":
                assert replies == [f"app_not_approved@{name}" for name in SITES]
                assert not any(marker.exists() for marker in markers)
                for name in SITES:
                    log = (deployment.root / "logs" / f"{name}.log").read_text(errors="replace")
                    assert f"app_not_approved: refused app {bundle_hash(app)}" in log
            else:
                assert replies == ["ok"] * len(SITES)
                assert all(marker.read_text() == "approved" for marker in markers)
