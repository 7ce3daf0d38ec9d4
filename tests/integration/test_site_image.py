"""The site image end to end, with podman (marker ``docker``; ``.ci/run`` installs podman).

1. ``make image`` builds the image from a local Debian base (``docker/local-base.sh``: kept
   between runs, as it holds nothing of the project), with this machine's pip settings: its
   local package indexes mounted read-only, PyPI for what they lack, through the host's CA.
2. In the container, as uid 10001 with a read-only root, a tmpfs ``/tmp`` and only the
   mounted site folder writable: ``client synth`` (a SynthCXR site), ``client keygen``,
   ``client approve`` and ``client check``.
3. A coordinator on loopback (``server certs``, ``start``, ``register-site``, ``app-hash``;
   TLS and site authentication on); the container joins it next to one native site, and
   ``server run`` completes a 2-round federation with both sites in MLflow.
4. No container wrote anything outside the site folder (``podman diff`` shows nothing beyond
   what podman prepares for a container that runs ``true``; the joined site wrote no file in
   its tmpfs ``/tmp``), and everything in the site folder belongs to uid 10001.

The images the test builds are removed at the end; the base image is kept.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow.tracking import MlflowClient

from server.coordinator import free_port, start_site
from server.processes import ProcessGroup
from server.tracking import experiment_name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.docker,
    pytest.mark.timeout(2400),
]

ROOT = Path(__file__).resolve().parents[2]
LOCAL_BASE = ROOT / "docker" / "local-base.sh"
#: The cached base is named after the script that made it: a changed script makes a new one.
BASE_REPOSITORY = "localhost/sicfed-base"
BASE_IMAGE = (
    f"{BASE_REPOSITORY}:bookworm-{hashlib.sha256(LOCAL_BASE.read_bytes()).hexdigest()[:12]}"
)
SITE_UID = 10001
ROUNDS = 2
SIZE = 64
#: podman's defaults fail on these machines (see the Makefile's PODMAN_FLAGS).
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
#: Where the host's CA bundle is mounted during the build (never over the image's own).
BUILD_CA = "/tmp/host-ca.crt"


def _podman() -> str:
    podman = shutil.which("podman")
    if podman is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but no podman on PATH: .ci/run installs podman")
        pytest.skip(
            "no podman on PATH: the site image is not built here (apt-get install podman "
            "buildah runc debootstrap uidmap slirp4netns containernetworking-plugins; "
            "mandatory when CI=true)"
        )
    return podman


def _run(argv: list[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert completed.returncode == 0, (
        f"{shlex.join(argv)} exited {completed.returncode}\n{completed.stdout}\n{completed.stderr}"
    )
    return completed


def _python_m(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", *args], timeout=timeout, cwd=ROOT)


def _pip_setting(name: str) -> str:
    """This machine's pip setting ``name`` (the environment first, as pip reads it)."""
    value = os.environ.get(f"PIP_{name.upper().replace('-', '_')}")
    if value is not None:
        return value
    listed = _run([sys.executable, "-m", "pip", "config", "list"]).stdout
    for line in listed.splitlines():
        key, _, text = line.partition("=")
        if key.endswith(f".{name}"):
            return text.strip().strip("'\"")
    return ""


def _build_arguments() -> list[str]:
    """pip's settings for the build, and the folders and CA bundle they need mounted."""
    arguments: list[str] = []
    mounts: set[str] = set()
    for name in ("index-url", "extra-index-url", "find-links"):
        value = _pip_setting(name)
        if not value:
            continue
        for location in value.split():
            path = urlparse(location).path if location.startswith("file:") else location
            if path.startswith("/"):  # a local index or wheel folder: the same path inside
                folder = Path(path)
                mounts.add(str(folder.parent if folder.name == "simple" else folder))
        variable = f"PIP_{name.upper().replace('-', '_')}"
        arguments += ["--build-arg", f"{variable}={value}"]
    for folder in sorted(mounts):
        arguments += ["-v", f"{folder}:{folder}:ro"]
    cert = _pip_setting("cert")
    if cert:
        arguments += ["-v", f"{cert}:{BUILD_CA}:ro", "--build-arg", f"PIP_CERT={BUILD_CA}"]
    return arguments


def _ensure_base(podman: str) -> None:
    if subprocess.run([podman, "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        return
    listed = _run([podman, "images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY])
    stale = [image for image in listed.stdout.split() if image.startswith(f"{BASE_REPOSITORY}:")]
    if stale:  # made by an earlier version of the script
        subprocess.run([podman, "rmi", *stale], capture_output=True, check=False)
    started = time.monotonic()
    environment = {**os.environ, "ENGINE": podman}
    _run(["bash", str(LOCAL_BASE), BASE_IMAGE], cwd=ROOT, env=environment)
    print(f"base image {BASE_IMAGE} made in {time.monotonic() - started:.0f} s")


def _image_ids(podman: str) -> set[str]:
    return set(_run([podman, "images", "--all", "--quiet", "--no-trunc"]).stdout.split())


@pytest.fixture(scope="module")
def site_image() -> Iterator[tuple[str, str]]:
    """``(podman, image)``: the site image built with ``make image``; removed afterwards."""
    podman = _podman()
    _ensure_base(podman)
    before = _image_ids(podman)
    image = f"localhost/sicfed-site:test-{uuid.uuid4().hex[:8]}"
    build_args = shlex.join(["--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *_build_arguments()])
    started = time.monotonic()
    try:
        _run(
            ["make", "image", f"ENGINE={podman}", f"IMAGE={image}", f"BUILD_ARGS={build_args}"],
            cwd=ROOT,
            timeout=1800,
        )
        size = int(_run([podman, "image", "inspect", "--format", "{{.Size}}", image]).stdout)
        print(f"site image built in {time.monotonic() - started:.0f} s, {size / 1e9:.2f} GB")
        yield podman, image
    finally:
        made = _image_ids(podman) - before
        if made:
            subprocess.run([podman, "rmi", "--force", *made], capture_output=True, check=False)


class Containers:
    """Runs the image as the hospital would, and removes every container it ran."""

    def __init__(self, podman: str, image: str, site_folder: Path) -> None:
        self.podman, self.image, self.site_folder = podman, image, site_folder
        self.names: list[str] = []

    def argv(self, name: str, *, network: str) -> list[str]:
        return [
            self.podman,
            "--runtime",
            "runc",
            "run",
            "--name",
            name,
            *ULIMITS,
            "--user",
            f"{SITE_UID}:{SITE_UID}",
            "--read-only",
            "--read-only-tmpfs=false",  # no writable /run or /var/tmp either
            "--tmpfs",
            "/tmp",
            "--network",
            network,
            "-v",
            f"{self.site_folder}:/site",
        ]

    def client(self, *args: str) -> str:
        """``python -m client ARGS`` in a fresh container without network; its output."""
        name = f"sicfed-test-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        argv = [*self.argv(name, network="none"), "--entrypoint", "python", self.image]
        return _run([*argv, "-m", "client", *args], timeout=600).stdout

    def join(self, *args: str) -> str:
        """Start the image's entrypoint (``client join ARGS``) detached; the container's name."""
        name = f"sicfed-test-join-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        detached = [*self.argv(name, network="host"), "--detach", "--restart", "unless-stopped"]
        _run([*detached, self.image, *args])
        return name

    def stop(self, name: str) -> str:
        """Stop a detached container as ``docker stop`` would; its state afterwards."""
        _run([self.podman, "stop", "--time", "30", name], timeout=120)
        return _run([self.podman, "inspect", "--format", "{{.State.Status}}", name]).stdout

    def files_in_image(self, folder: str) -> set[str]:
        """The regular files under ``folder`` in a fresh container of the image."""
        name = f"sicfed-test-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        argv = [*self.argv(name, network="none"), "--entrypoint", "find", self.image]
        return set(_run([*argv, folder, "-type", "f"]).stdout.split())

    def true(self) -> str:
        """Run ``true`` (which writes nothing) in a fresh container; the container's name."""
        name = f"sicfed-test-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        _run([*self.argv(name, network="none"), "--entrypoint", "true", self.image])
        return name

    def diff(self, name: str) -> str:
        return _run([self.podman, "diff", name]).stdout.strip()

    def remove_all(self) -> None:
        for name in self.names:
            subprocess.run([self.podman, "rm", "--force", name], capture_output=True, check=False)


def test_the_site_image_joins_a_federation_from_a_read_only_container(
    site_image: tuple[str, str], tmp_path: Path
) -> None:
    podman, image = site_image
    hospital = tmp_path / "hospital"  # the folder mounted at /site
    hospital.mkdir()
    os.chown(hospital, SITE_UID, SITE_UID)
    hospital.chmod(0o700)
    containers = Containers(podman, image, hospital)
    home = tmp_path / "coordinator"
    site_yaml = "/site/synth/site_a/site.yaml"
    began = time.monotonic()
    try:
        containers.client("synth", "--out", "/site/synth", "--size", str(SIZE), "--scale", "0.1")
        containers.client("keygen", "--out", "/site/keys", "--comment", "site_a")

        _python_m("server", "certs", "--home", str(home), "--san", "127.0.0.1")
        fleet_port = free_port(8000)
        mlflow_port = free_port(5000)
        coordinator = _python_m(
            "server",
            "start",
            "--home",
            str(home),
            "--port",
            str(fleet_port),
            "--control-port",
            str(free_port(fleet_port + 1)),
            "--mlflow-port",
            str(mlflow_port),
        )
        assert "--auth-key" in coordinator.stdout, coordinator.stdout
        shutil.copy(home / "tls" / "ca.crt", hospital / "ca.crt")
        os.chown(hospital / "ca.crt", SITE_UID, SITE_UID)
        app_hash = re.search(r"sha256:[0-9a-f]{64}", _python_m("server", "app-hash").stdout)[0]

        approved = containers.client("approve", "--site", site_yaml, "--app-hash", app_hash)
        assert "approved" in approved, approved
        checked = containers.client("check", "--site", site_yaml, "--workers", "1")
        assert "Site site_a can train." in checked, checked

        native = tmp_path / "native"
        _python_m("client", "synth", "--out", str(native), "--size", str(SIZE), "--scale", "0.1")
        native_yaml = native / "site_b" / "site.yaml"
        _python_m("client", "keygen", "--out", str(native / "keys"), "--comment", "site_b")
        _python_m("client", "approve", "--site", str(native_yaml), "--app-hash", app_hash)
        for name, public_key in (
            ("site_a", hospital / "keys" / "site_ecdsa.pub"),
            ("site_b", native / "keys" / "site_ecdsa.pub"),
        ):
            _python_m(
                "server", "register-site", "--home", str(home), "--name", name,
                "--public-key", str(public_key),
            )  # fmt: skip

        print(f"site prepared in containers, coordinator up: {time.monotonic() - began:.0f} s")
        with ProcessGroup() as group:
            superlink = f"127.0.0.1:{fleet_port}"
            joined = containers.join(
                "--site",
                site_yaml,
                "--superlink",
                superlink,
                "--local-port",
                str(free_port(9094)),
                "--root-certificates",
                "/site/ca.crt",
                "--auth-key",
                "/site/keys/site_ecdsa",
                "--poll-interval",
                "0.25",
                "--threads",
                "1",
            )
            start_site(
                group,
                native_yaml,
                name="site_b",
                superlink=superlink,
                port=free_port(9194),
                log_path=tmp_path / "site_b.log",
                poll_interval=0.25,
                threads=1,
                root_certificates=home / "tls" / "ca.crt",
                auth_key=native / "keys" / "site_ecdsa",
            )
            run = subprocess.run(
                [
                    sys.executable, "-m", "server", "run", "--home", str(home),
                    "--set", f"rounds={ROUNDS}", "--set", f"image-size={SIZE}",
                    "--set", "local-epochs=1", "--set", "batch-size=16",
                    "--set", f"anchor-rounds={ROUNDS}", "--set", "min-sites=2",
                    "--set", "node-wait=300", "--set", "study=container",
                    "--timeout", "900",
                ],
                capture_output=True, text=True, timeout=1000, cwd=ROOT, check=False,
            )  # fmt: skip
            print(f"joined and federated ({ROUNDS} rounds): {time.monotonic() - began:.0f} s")
            logs = subprocess.run([podman, "logs", joined], capture_output=True, text=True)
            assert run.returncode == 0, (
                f"{run.stdout}\n{run.stderr}\ncontainer:\n{logs.stdout}{logs.stderr}\n"
                f"native site:\n{(tmp_path / 'site_b.log').read_text()}"
            )
            # /tmp is a tmpfs that starts with the image's own /tmp (podman copies it up):
            # the joined site may make folders there (torch makes its inductor cache
            # folder on import), but it writes no file of its own.
            runtime_tmp = _run([podman, "exec", joined, "find", "/tmp", "-mindepth", "1"])
            print(f"/tmp of the joined site:\n{runtime_tmp.stdout}")
            written_in_tmp = set(
                _run([podman, "exec", joined, "find", "/tmp", "-type", "f"]).stdout.split()
            )
            assert written_in_tmp <= containers.files_in_image("/tmp"), written_in_tmp
            group.check_alive()
            assert containers.stop(joined).strip() == "exited"

        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name(experiment_name("container"))
        runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
        for site in ("site_a", "site_b"):
            history = client.get_metric_history(runs[f"site-{site}"].info.run_id, "perf/auroc")
            assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1)), site

        # podman itself prepares every container before its process starts (an /etc/mtab
        # link where the image has none): a container that runs `true` shows what that is.
        baseline = containers.diff(containers.true())
        for name in containers.names:
            changed = set(containers.diff(name).splitlines()) - set(baseline.splitlines())
            assert changed == set(), (name, changed)  # nothing written outside /site
        written = [p for p in hospital.rglob("*")]
        assert hospital / "keys" / "site_ecdsa" in written
        assert (hospital / "synth" / "site_a" / "state").is_dir()
        assert {p.stat().st_uid for p in written} == {SITE_UID}
    finally:
        containers.remove_all()
        subprocess.run(
            [sys.executable, "-m", "server", "stop", "--home", str(home)],
            capture_output=True, timeout=120, cwd=ROOT, check=False,
        )  # fmt: skip
