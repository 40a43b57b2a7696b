"""Security end to end on the real cluster (mutual TLS everywhere, podman, CRIU, S3): roles through
the CLI, a forged manifest refused before CRIU runs, an agent revoked and re-admitted with a new
certificate, a user calling an agent directly, and the audit trail of it all."""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest

from e2e_helpers import name, one_error_line

pytestmark = pytest.mark.e2e
MIB = 16


def _with_repo(cluster, fn):
    from stasis.storage.repository import Repository

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("AWS_")})
    try:
        repo = Repository.open(cluster.repo_url, cluster.env["STASIS_PASSWORD"])
        repo.refresh_index()
        return fn(repo)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_roles_through_the_cli(cluster):
    a = cluster.hosts["host-a"]
    web = name("roles")
    a.run_workload(web, MIB)
    who = cluster.cli_json("whoami")
    assert who["principal"] == "user:admin" and who["role"] == "admin" and who["tls"] is True
    assert cluster.cli("ps", "--host", "host-a", user="viewer").returncode == 0
    denied = cluster.cli("checkpoint", f"host-a/{web}", "--leave-running", user="viewer", check=False)
    assert denied.returncode == 1
    assert "permission denied: user:viewer (viewer) lacks role operator" in one_error_line(denied.stderr)
    denied = cluster.cli("forget", "--container", web, "--keep-last", "1", "--prune", user="operator", check=False)
    assert "lacks role admin" in one_error_line(denied.stderr)
    assert cluster.cli("audit", user="operator", check=False).returncode == 1
    ckpt = cluster.cli("checkpoint", f"host-a/{web}", "--leave-running", user="operator").stdout.strip()
    entries = cluster.cli_json("audit", "--since", "10m")
    mine = [e for e in entries if e["method"] == "Checkpoint" and e["target"].get("container") == web]
    assert [(e["principal"], e["code"]) for e in mine] == [("user:operator", "OK"), ("user:viewer",
                                                                                      "PERMISSION_DENIED")]
    assert mine[0]["job_id"]
    assert ckpt


def test_a_forged_manifest_is_refused_before_criu_runs(cluster):
    """Someone with the repository password (but no agent's key) rewrites a checkpoint's manifest."""
    import dataclasses

    a, b = cluster.hosts["host-a"], cluster.hosts["host-b"]
    web = name("forged")
    a.run_workload(web, MIB)
    ckpt = cluster.cli("checkpoint", f"host-a/{web}", "--leave-running").stdout.strip()

    def forge(repo):
        m = repo.read_manifest(ckpt)
        assert m.signature and "BEGIN CERTIFICATE" in m.signature["cert"]
        # Keep the valid signature, change what it covers (here: a label), re-seal with the key.
        forged = dataclasses.replace(m, container=dataclasses.replace(m.container, labels={"evil": "1"}),
                                     parsed_body=b"")
        repo.write_manifest(forged)
        return m

    original = _with_repo(cluster, forge)
    try:
        result = cluster.cli("restore", ckpt, "--to", "host-b", "--name", web, check=False)
        assert result.returncode == 1
        assert "modified after agent host-a wrote it" in one_error_line(result.stderr)
        assert web not in [c["Names"][0] for c in b.containers()]
        # Unsigned (the signature stripped) is refused too.
        _with_repo(cluster, lambda repo: repo.write_manifest(dataclasses.replace(original, signature=None,
                                                                                  parsed_body=b"")))
        result = cluster.cli("restore", ckpt, "--to", "host-b", "--name", web, check=False)
        assert "is not signed by any agent" in one_error_line(result.stderr)
        assert web not in [c["Names"][0] for c in b.containers()]
    finally:
        _with_repo(cluster, lambda repo: repo.write_manifest(original))
    # The genuine manifest restores.
    cluster.cli("restore", ckpt, "--to", "host-b", "--name", web)
    assert b.verify_memory(web)["verified"] == "ok"


def test_users_cannot_call_agents_directly(cluster):
    from stasis.proto.v1 import stasis_pb2 as pb
    from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
    from stasis.security.pki import agent_server_name
    from stasis.security.tls import Transport

    a = cluster.hosts["host-a"]
    stub = pb_grpc.AgentStub(Transport(cluster.bundle("user", "admin")).channel(a.address,
                                                                                 agent_server_name("host-a")))
    with pytest.raises(grpc.RpcError) as err:
        stub.ListContainers(pb.ListContainersRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "users may not call this method (only controller)" in err.value.details()
    # No certificate at all: the handshake fails.
    plain = pb_grpc.AgentStub(grpc.insecure_channel(a.address))
    with pytest.raises(grpc.RpcError) as err:
        plain.ListContainers(pb.ListContainersRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _state(cluster, host: str) -> str | None:
    return {h["name"]: h["state"] for h in cluster.cli_json("hosts")}.get(host)


def _wait(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_revoked_agent_is_cut_off_and_a_rotated_certificate_readmits_it(cluster):
    h = cluster.add_host(f"host-rev-{cluster.backend}")
    cluster.wait_hosts_up([h.name])
    out = cluster.cli_json("certs", "revoke", f"agent:{h.name}", "--reason", "host decommissioned")
    assert out["principal"] == f"agent:{h.name}"
    assert _state(cluster, h.name) is None            # forgotten at once
    result = cluster.cli("ps", "--host", h.name, check=False)
    assert f"unknown host '{h.name}'" in one_error_line(result.stderr)
    time.sleep(3)                                      # its heartbeats and re-registrations are refused
    assert _state(cluster, h.name) is None
    revoked = cluster.cli_json("certs", "revoked")
    assert any(r["principal"] == f"agent:{h.name}" for r in revoked)
    # A new certificate, written over the old bundle, is picked up without restarting the agent.
    time.sleep(1.1)
    cluster.ca.issue("agent", h.name)
    assert _wait(lambda: _state(cluster, h.name) == "up"), "the agent did not re-register with its new certificate"
    assert h.proc.poll() is None
    refusals = [e for e in cluster.cli_json("audit", "--user", f"agent:{h.name}", "--limit", "500")
                if e["code"] == "UNAUTHENTICATED"]
    assert refusals and "revoked" in refusals[0]["message"]


def test_certs_commands_teach(cluster, tmp_path):
    from stasis.testbed.cluster import stasis_argv
    import subprocess

    ca = str(tmp_path / "ca")

    def run(*args):
        return subprocess.run([*stasis_argv(), *args], capture_output=True, text=True, timeout=60)

    assert run("certs", "init", "--dir", ca).returncode == 0
    again = run("certs", "init", "--dir", ca)
    assert again.returncode == 1 and "already holds a CA" in again.stderr
    issued = run("certs", "issue", "user", "alice", "--role", "operator", "--dir", ca, "--json")
    doc = json.loads(issued.stdout)
    assert doc["principal"] == "user:alice" and doc["role"] == "operator"
    shown = json.loads(run("certs", "show", doc["bundle"], "--json").stdout)
    assert shown["serial"] == doc["serial"] and 89 < shown["expires_in_days"] <= 90
    bad = run("certs", "issue", "user", "bob", "--dir", ca)
    assert bad.returncode == 2 and "needs --role" in bad.stderr
    # A user of another CA is refused by the cluster's controller at the handshake.
    foreign = subprocess.run([*stasis_argv(), "--controller", cluster.controller_address, "--tls", doc["bundle"],
                              "hosts"], capture_output=True, text=True, timeout=60)
    assert foreign.returncode == 1 and "TLS handshake with controller" in one_error_line(foreign.stderr)
