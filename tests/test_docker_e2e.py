"""End to end on real docker engines (two dockerd daemons as two hosts) and CRIU, through stasis."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from e2e_helpers import LATE, log_lines, migrate_killing_the_destination_once_its_copy_runs, name, wait_gone

pytestmark = pytest.mark.e2e
MIB = 32


def test_checkpoint_restore_between_docker_hosts_keeps_memory_and_files(docker_cluster):
    a, b = docker_cluster.hosts["dock-a"], docker_cluster.hosts["dock-b"]
    web = name("web")
    a.run_workload(web, MIB)
    time.sleep(0.3)
    before, lines = a.status(web), log_lines(a, web)
    assert b.podman("image", "inspect", "localhost/stasis-memhold:1", check=False).returncode != 0  # absent on b
    ckpt = docker_cluster.cli("checkpoint", f"dock-a/{web}").stdout.strip()
    shown = docker_cluster.cli_json("checkpoints", ckpt)
    assert shown["runtime"] == "docker" and shown["image_bytes"] == 0   # the commit travels in the archive
    docker_cluster.cli("restore", ckpt, "--to", "dock-b")
    after = b.verify_memory(web)
    assert (after["nonce"], after["verified"]) == (before["nonce"], "ok")
    assert int(after["counter"]) > int(before["counter"])
    # /data/new/log was created after start and is still open: it travelled and keeps growing.
    assert log_lines(b, web) >= lines
    time.sleep(0.5)
    assert log_lines(b, web) > lines


def test_docker_migrate_and_rollback(docker_cluster):
    a, b = docker_cluster.hosts["dock-a"], docker_cluster.hosts["dock-b"]
    web = name("mig")
    a.run_workload(web, MIB)
    before = a.status(web)
    job = docker_cluster.cli_json("migrate", f"dock-a/{web}", "--to", "dock-b")
    assert job["state"] == "succeeded", job["error"]
    assert job["downtime_seconds"] > 0 and "checkpoint" in job["timings"]
    assert b.verify_memory(web)["nonce"] == before["nonce"]
    assert web not in [c["Names"][0] for c in a.containers()]

    bad = docker_cluster.add_host("dock-fail", runtime="docker",
                                  extra_env={"STASIS_FAILPOINTS": "restore.before_runtime"})
    docker_cluster.wait_hosts_up(["dock-fail"])
    other = name("rb")
    a.run_workload(other, MIB)
    start = a.status(other)
    result = docker_cluster.cli("migrate", f"dock-a/{other}", "--to", "dock-fail", "--json", check=False)
    job = json.loads(result.stdout)
    assert result.returncode != 0 and job["state"] == "rolled_back", job
    after = a.verify_memory(other)   # resumed from its own checkpoint, same memory
    assert (after["nonce"], after["verified"]) == (start["nonce"], "ok")
    assert other not in [c["Names"][0] for c in bad.containers()]


def test_a_docker_destination_agent_killed_after_its_restore_removes_that_copy_when_it_is_back(docker_cluster):
    """As on podman (test_e2e), with docker's restore making a new container id the journal learns
    once docker has created the container."""
    a = docker_cluster.hosts["dock-a"]
    dst = docker_cluster.add_host("dock-late", runtime="docker", extra_env=LATE)
    docker_cluster.wait_hosts_up([dst.name])
    web = name("late")
    a.run_workload(web, MIB)
    before = a.status(web)
    job = migrate_killing_the_destination_once_its_copy_runs(docker_cluster, "dock-a", dst, web)
    assert job["state"] == "failed" and f"may also run on {dst.name} until its agent is back" in job["error"], job
    after = a.verify_memory(web)
    assert (after["nonce"], after["verified"]) == (before["nonce"], "ok")
    assert [c["State"] for c in dst.containers() if c["Names"][0] == web] == ["running"]   # two, for now
    docker_cluster.start_agent(dst)   # its next agent, failpoint disarmed
    docker_cluster.wait_hosts_up([dst.name])
    wait_gone(dst, web)
    a.podman("rm", "-f", web)


def test_docker_checkpoint_refused_on_podman_host(docker_cluster):
    a = docker_cluster.hosts["dock-a"]
    web = name("x")
    a.run_workload(web, MIB)
    ckpt = docker_cluster.cli("checkpoint", f"dock-a/{web}", "--leave-running").stdout.strip()
    result = docker_cluster.cli("restore", ckpt, "--to", "pod-c", check=False)
    assert result.returncode != 0
    assert "was taken with docker; this host runs podman" in result.stderr
    job = docker_cluster.cli("migrate", f"dock-a/{web}", "--to", "pod-c", check=False)
    assert job.returncode != 0 and "runs docker" in job.stderr and "runs podman" in job.stderr
    assert a.status(web)["verified"] in ("never", "ok")   # untouched, still running


def test_dockerd_without_experimental_is_a_clear_error(docker_cluster):
    import shutil
    import tempfile

    from stasis.testbed.cluster import DockerHost, stasis_argv

    # A short root: containerd's socket path inside it must stay under the 108-byte limit.
    root = tempfile.mkdtemp(prefix="stasis-dk-", dir="/var/tmp")
    plain = DockerHost("plain", root, 0, experimental=False)
    plain.start_dockerd()
    try:
        result = subprocess.run([*stasis_argv(), "agent", "serve", "--host-name", "plain", "--runtime", "docker",
                                 "--docker-host", plain.socket, "--listen", "127.0.0.1:0", "--insecure"],
                                capture_output=True, text=True, timeout=60)
    finally:
        plain.stop_dockerd()
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "experimental" in result.stderr and "daemon.json" in result.stderr


def test_probe_reports_engine(docker_cluster):
    hosts = {h["name"]: h for h in docker_cluster.cli_json("hosts")}
    info = hosts["dock-a"]["info"]
    assert info["runtime"] == "docker" and info["engine_experimental"] is True
    assert info["engine_api_version"].startswith("1.")
