"""Shared fixtures. End-to-end fixtures start real services (SeaweedFS, a controller, agents in
their own mount namespaces) and stop them, by process id, when the session ends.

Under CI=true a missing podman, CRIU or S3 server fails the run; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid

import pytest

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if CI:
        pytest.fail(f"{what} (CI=true: a missing component is a failure, not a skip)")
    pytest.skip(what)


def require_criu_decoders() -> None:
    """At a test module's top: the CRIU image decoders scripts/criu-images.sh generates."""
    import importlib.util
    if importlib.util.find_spec("stasis.forensics.criu_pb") is not None:
        return
    missing = "CRIU image decoders are not generated: run 'bash scripts/criu-images.sh' (or 'make provision')"
    if CI:
        pytest.fail(f"{missing} (CI=true: a missing component is a failure, not a skip)", pytrace=False)
    pytest.skip(missing, allow_module_level=True)


@pytest.fixture(scope="session")
def real_stack():
    """podman, runc, a working CRIU 4.x, root: what every end-to-end test needs."""
    require(os.geteuid() == 0, "end-to-end tests need root")
    require(shutil.which("podman") is not None, "podman is not installed: run 'make provision'")
    require(shutil.which("runc") is not None, "runc is not installed: run 'make provision'")
    criu = shutil.which("criu")
    version = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout if criu else ""
    require("Version: 4." in version, "CRIU 4.x is not installed: run 'make provision'")
    require(shutil.which("busybox") is not None or os.path.exists("/bin/busybox"),
            "busybox-static is not installed: run 'make provision'")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    from stasis.testbed.seaweed import SeaweedFS, weed_binary

    require(weed_binary() is not None, "SeaweedFS (weed) is not installed: run 'make provision'")
    server = SeaweedFS(str(tmp_path_factory.mktemp("seaweedfs"))).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    for k, v in seaweedfs.env.items():
        monkeypatch.setenv(k, v)
    return seaweedfs.env


def _repo_url(kind: str, base: str, seaweed) -> tuple[str, dict[str, str]]:
    if kind == "file":
        return f"file://{base}/repo", {}
    return f"s3://stasis-e2e-{uuid.uuid4().hex[:8]}/repo", seaweed.env


@pytest.fixture(scope="session", params=["file", "s3"])
def cluster(request, real_stack, tmp_path_factory):
    """A controller and two hosts (host-a with the workload image, host-b without), on one backend."""
    from stasis.testbed.cluster import Cluster

    base = tempfile.mkdtemp(prefix=f"stasis-e2e-{request.param}-", dir="/var/tmp")
    seaweed = request.getfixturevalue("seaweedfs") if request.param == "s3" else None
    url, env = _repo_url(request.param, base, seaweed)
    c = Cluster(base, url, env)
    c.backend = request.param
    try:
        c.start_controller()
        a = c.add_host("host-a")
        c.add_host("host-b")
        c.wait_hosts_up(["host-a", "host-b"])
        a.import_image("localhost/stasis-memhold:1")
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_cluster(real_stack):
    """A controller, two docker hosts (each its own dockerd) and one podman host."""
    from stasis.testbed.cluster import Cluster

    require(shutil.which("dockerd") is not None, "dockerd is not installed: run 'make provision'")
    require(shutil.which("docker") is not None, "the docker client is not installed: run 'make provision'")
    base = tempfile.mkdtemp(prefix="stasis-e2e-docker-", dir="/var/tmp")
    c = Cluster(base, f"file://{base}/repo")
    try:
        c.start_controller()
        a = c.add_host("dock-a", runtime="docker")
        c.add_host("dock-b", runtime="docker")
        c.add_host("pod-c", runtime="podman")
        c.wait_hosts_up(["dock-a", "dock-b", "pod-c"])
        a.import_image("localhost/stasis-memhold:1")
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)
