"""The security building blocks on their own: CA and bundles, rotation, deny list, manifest
provenance, input limits and the method rules."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os

import pytest
import zstandard

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.security import limits
from stasis.security.authz import Rule, service_methods
from stasis.security.pki import CLOCK_SKEW, Authority, identity_of, signing_public_key
from stasis.security.provenance import Signer, Verifier
from stasis.security.revocation import DenyList, parse_target
from stasis.security.tls import Transport, is_loopback, read_bundle
from stasis.storage.manifest import Artifact, ContainerRef, Manifest



@pytest.fixture
def ca(tmp_path):
    return Authority.init(str(tmp_path / "pki"))


def ident(ca, kind, name, role="", **kw):
    return ca.issue(kind, name, role=role, **kw)[1]


# ------------------------------------------------------------------ CA and bundles

def test_issued_bundles_carry_identity_role_and_signing_key(ca):
    path, admin = ca.issue("user", "alice", role="admin")
    assert (admin.principal, admin.role) == ("user:alice", "admin")
    assert oct(os.stat(os.path.join(path, "tls.key")).st_mode & 0o777) == "0o600"
    assert oct(os.stat(os.path.join(ca.folder, "ca.key")).st_mode & 0o777) == "0o600"
    path, agent = ca.issue("agent", "host-a")
    assert agent.principal == "agent:host-a" and agent.role == ""
    cert = read_bundle(path)
    from cryptography import x509
    c = x509.load_pem_x509_certificate(cert.cert)
    assert signing_public_key(c) is not None
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host-a.agent.stasis"]
    assert identity_of(c) == agent


@pytest.mark.parametrize("kind,name,role", [("user", "bob", ""), ("user", "bob", "root"), ("agent", "Host_A", ""),
                                            ("agent", "a" * 64, ""), ("controller", "ctl", ""),
                                            ("agent", "host-a", "admin"), ("wizard", "x", "")])
def test_bad_issue_requests_are_refused(ca, kind, name, role):
    with pytest.raises(InvalidArgument):
        ca.issue(kind, name, role=role)


def test_init_refuses_to_overwrite_a_ca(ca):
    with pytest.raises(FailedPrecondition, match="already holds a CA"):
        Authority.init(ca.folder)


def test_missing_and_mismatched_bundles_are_clear(ca, tmp_path):
    with pytest.raises(FailedPrecondition, match="no TLS bundle"):
        read_bundle(str(tmp_path / "nothing"))
    a, _ = ca.issue("user", "a", role="viewer")
    b, _ = ca.issue("user", "b", role="viewer")
    os.replace(os.path.join(b, "tls.key"), os.path.join(a, "tls.key"))
    with pytest.raises(FailedPrecondition, match="do not belong together"):
        read_bundle(a)


def test_transport_picks_up_a_rotated_bundle_and_keeps_the_last_good_one(ca):
    path, first = ca.issue("user", "alice", role="viewer")
    t = Transport(path)
    assert t.identity.serial == first.serial
    _, second = ca.issue("user", "alice", role="operator")
    assert t.identity.serial == second.serial and t.identity.role == "operator"
    with open(os.path.join(path, "tls.crt"), "w") as f:     # a half-written rotation
        f.write("-----BEGIN CERTIFICATE-----\ngarbage\n")
    assert t.identity.serial == second.serial


def test_insecure_is_loopback_only():
    assert is_loopback("127.0.0.1:7070") and is_loopback("localhost:1") and is_loopback("[::1]:5")
    assert not is_loopback("0.0.0.0:7070") and not is_loopback("10.1.2.3:7070")
    with pytest.raises(InvalidArgument, match="loopback only"):
        Transport.insecure().channel("192.0.2.1:7070", "controller.stasis")


# ------------------------------------------------------------------ revocation

def test_revoking_a_principal_denies_older_certificates_only(ca, tmp_path):
    old = ident(ca, "user", "alice", "admin")
    now = dt.datetime.now(dt.timezone.utc)
    deny = DenyList(path=str(tmp_path / "deny.json"))
    deny.add(parse_target("user:alice", "left", now=now))
    assert deny.denied(old) is not None
    newer = ident(ca, "user", "alice", "admin", not_before=now + dt.timedelta(seconds=2) - CLOCK_SKEW)
    assert deny.denied(newer) is None
    assert deny.denied(ident(ca, "user", "bob", "admin")) is None
    # Persisted: a restarted agent still refuses it.
    assert DenyList(path=str(tmp_path / "deny.json")).denied(old) is not None


def test_revoking_one_serial(ca):
    one, two = ident(ca, "agent", "host-a"), ident(ca, "agent", "host-a")
    deny = DenyList([parse_target(f"{one.serial:x}")])
    assert deny.denied(one) is not None and deny.denied(two) is None


@pytest.mark.parametrize("target", ["alice", "user:", "user:../x", "0x0", "zz", "group:x"])
def test_bad_revocation_targets(target):
    with pytest.raises(InvalidArgument):
        parse_target(target)


def test_a_damaged_saved_deny_list_fails_closed(tmp_path):
    (tmp_path / "deny.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="unreadable"):
        DenyList(path=str(tmp_path / "deny.json"))


# ------------------------------------------------------------------ provenance

def manifest(host="host-a", created=None) -> Manifest:
    art = Artifact.build([(bytes([i]) * 32, 4096) for i in range(3)])
    now = dt.datetime.now(dt.timezone.utc)   # not import time: the suite may reach this test much later
    return Manifest(id="0123456789abcdef", created=created or now.isoformat(timespec="milliseconds"), host=host,
                    runtime="podman", runtime_version="4.3.1", criu_version="4.1.1",
                    container=ContainerRef("c" * 64, "web", "localhost/x:1", "a" * 64, {"app": "web"}),
                    leave_running=False, checkpoint=art, image=None, timings={"dump": 0.5, "upload": 1.25},
                    criu_stats={"frozen_time": 123}, operation_id="op1", tags={"k": "v"}, new_bytes=10)


def roundtrip(m: Manifest) -> Manifest:
    return Manifest.from_bytes(m.to_bytes())


def verifier(ca, deny=None, allow_unsigned=False):
    return Verifier(lambda: [ca.cert], deny or DenyList(), allow_unsigned)


def test_signed_manifest_verifies_after_storage_roundtrip(ca):
    path, agent = ca.issue("agent", "host-a")
    signed = roundtrip(Signer(path).sign(manifest()))
    assert verifier(ca).verify(signed) == agent


def forge(m: Manifest, **changes) -> Manifest:
    """What someone holding the repository key (but no agent key) can do: rewrite the JSON."""
    doc = json.loads(zstandard.ZstdDecompressor().decompress(m.to_bytes()))
    doc.update(changes)
    return Manifest.from_bytes(zstandard.ZstdCompressor().compress(json.dumps(doc).encode()))


def test_any_change_to_a_signed_manifest_is_refused(ca):
    path, _ = ca.issue("agent", "host-a")
    signed = Signer(path).sign(manifest())
    for change in ({"leave_running": True}, {"tags": {"k": "w"}},
                   {"artifacts": {"checkpoint": Artifact.build([(b"\x09" * 32, 4096)]).to_json(), "image": None}}):
        with pytest.raises(IntegrityError, match="modified after"):
            verifier(ca).verify(forge(signed, **change))


def test_provenance_refusals(ca, tmp_path):
    path, agent = ca.issue("agent", "host-a")
    other_ca = Authority.init(str(tmp_path / "other"))
    foreign, _ = other_ca.issue("agent", "host-a")
    with pytest.raises(IntegrityError, match="not issued by this stasis CA"):
        verifier(ca).verify(Signer(foreign).sign(manifest()))
    # host-b's key cannot vouch for a checkpoint that claims to come from host-a.
    b, _ = ca.issue("agent", "host-b")
    with pytest.raises(IntegrityError, match="claims to come from agent:host-a"):
        verifier(ca).verify(Signer(b).sign(manifest()))
    with pytest.raises(IntegrityError, match="revoked"):
        verifier(ca, DenyList([parse_target("agent:host-a")])).verify(
            Signer(path).sign(manifest()))
    with pytest.raises(IntegrityError, match="not signed"):
        verifier(ca).verify(manifest())
    assert verifier(ca, allow_unsigned=True).verify(manifest()) is None
    # Signed outside the certificate's validity.
    with pytest.raises(IntegrityError, match="not valid at"):
        verifier(ca).verify(Signer(path).sign(manifest(created="2001-01-01T00:00:00.000Z")))
    # A signature block with the wrong shape is refused, not crashed on.
    signed = Signer(path).sign(manifest())
    for sig in ({"alg": "rsa"}, {"alg": "ed25519", "cert": "x"}, {**signed.signature, "sig": "!!"}):
        with pytest.raises(IntegrityError):
            verifier(ca).verify(dataclasses.replace(signed, signature=sig))


def test_signer_refuses_a_bundle_without_a_matching_key(ca):
    path, _ = ca.issue("agent", "host-a")
    os.remove(os.path.join(path, "signing.key"))
    with pytest.raises(FailedPrecondition, match="signing.key"):
        Signer(path)
    user, _ = ca.issue("user", "u", role="viewer")
    with pytest.raises(FailedPrecondition):
        Signer(user)


# ------------------------------------------------------------------ input limits and rules

@pytest.mark.parametrize("request_,field", [
    (pb.MigrateRequest(host="host-a", container="web", to="Host B"), "MigrateRequest.to"),
    (pb.CheckpointRequest(host="host-a", container="../etc"), "CheckpointRequest.container"),
    (pb.RestoreRequest(checkpoint_id="xyz"), "RestoreRequest.checkpoint_id"),
    (pb.RestoreRequest(checkpoint_id="ab", name="a" * 200), "RestoreRequest.name"),
    (pb.Schedule(name="n", every_seconds=float("nan")), "Schedule.every_seconds"),
    (pb.Schedule(name="n", labels={f"k{i}": "v" for i in range(65)}), "Schedule.labels"),
    (pb.Schedule(name="n", pre_hook="x" * 5000), "Schedule.pre_hook"),
    (pb.ListJobsRequest(limit=-1), "ListJobsRequest.limit"),
    (pb.ExecRequest(container="web", argv=["x"] * 300), "ExecRequest.argv"),
    (pb.RegisterAgentRequest(name="a", info=pb.HostInfo(kernel="k\x00")), "RegisterAgentRequest.info.kernel"),
    (pb.RevokeRequest(target="everyone"), "RevokeRequest.target"),
])
def test_limits_name_the_field(request_, field):
    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        limits.validate(request_)


def test_limits_pass_ordinary_requests():
    for r in (pb.MigrateRequest(host="host-a", container="web", to="host-b", request_id="r-1"),
              pb.Schedule(name="nightly", selector="host-a/web", cron="0 3 * * *", labels={"app": "db"},
                          retention=pb.RetentionPolicy(keep_last=3)),
              pb.RestoreRequest(checkpoint_id="3f2a", host="host-b", name="web2"),
              pb.RevokeRequest(target="user:alice"), pb.RevokeRequest(target="1f2e3d")):
        limits.validate(r)


def test_every_method_has_a_rule():
    from stasis.agent.server import RULES as AGENT
    from stasis.controller.server import RULES as CONTROLLER

    for service, rules in (("Agent", AGENT), ("Controller", CONTROLLER)):
        methods = service_methods(pb.DESCRIPTOR.services_by_name[service])
        assert sorted(rules) == sorted(methods)
    # Agents serve the controller; peer agents may only fetch, decline the bulk channel and relay
    # memory (with a ticket, checked by the service).
    assert {m for m, r in AGENT.items() if r.kinds != {"controller"} or r.role} == {
        "/stasis.v1.Agent/FetchCheckpoint", "/stasis.v1.Agent/RelayPages", "/stasis.v1.Agent/DeclineBulk"}
    assert AGENT["/stasis.v1.Agent/FetchCheckpoint"].kinds == {"agent"}


def test_roles_are_ordered_and_forget_with_prune_needs_admin(ca):
    from stasis.controller.server import RULES

    users = {r: ident(ca, "user", r, r) for r in ("viewer", "operator", "admin")}
    rule = RULES["/stasis.v1.Controller/Migrate"]
    assert rule.admits(users["viewer"], pb.MigrateRequest())
    assert rule.admits(users["operator"], pb.MigrateRequest()) is None
    assert rule.admits(users["admin"], pb.MigrateRequest()) is None
    assert rule.admits(ident(ca, "agent", "host-a"), pb.MigrateRequest())
    forget = RULES["/stasis.v1.Controller/Forget"]
    assert forget.admits(users["operator"], pb.ForgetRequest(dry_run=True)) is None
    assert "lacks role admin" in forget.admits(users["operator"], pb.ForgetRequest(prune=True))
    assert forget.admits(users["admin"], pb.ForgetRequest(prune=True)) is None
    assert Rule(kinds=frozenset({"agent"})).admits(users["admin"], None)


# ------------------------------------------------------------------ migration tickets

def test_tickets_admit_exactly_one_fetch_of_one_checkpoint_by_one_agent(ca):
    from stasis.errors import PermissionDenied
    from stasis.security.tickets import TicketChecker, mint

    controller = Transport(ca.issue("controller", "controller")[0])
    deny = DenyList()
    source = TicketChecker(lambda: [ca.cert], deny, "host-a")
    ticket = mint(controller, "job1", "0123456789abcdef", "host-a", "host-b")
    claims = source.check(ticket, "0123456789abcdef", "host-b")
    assert claims["job"] == "job1"
    with pytest.raises(PermissionDenied, match="used before"):
        source.check(ticket, "0123456789abcdef", "host-b")
    fresh = mint(controller, "job1", "0123456789abcdef", "host-a", "host-b")
    with pytest.raises(PermissionDenied, match="destination 'host-b', not 'host-c'"):
        source.check(fresh, "0123456789abcdef", "host-c")
    with pytest.raises(PermissionDenied, match="checkpoint"):
        source.check(mint(controller, "j", "0123456789abcdef", "host-a", "host-b"), "fedcba9876543210", "host-b")
    with pytest.raises(PermissionDenied, match="source 'host-z'"):
        source.check(mint(controller, "j", "0123456789abcdef", "host-z", "host-b"), "0123456789abcdef", "host-b")
    with pytest.raises(PermissionDenied, match="expired"):
        source.check(mint(controller, "j", "0123456789abcdef", "host-a", "host-b", ttl=-1), "0123456789abcdef",
                     "host-b")
    # An agent cannot mint tickets for itself, nor can a revoked controller.
    agent = Transport(ca.issue("agent", "host-b")[0])
    with pytest.raises(PermissionDenied, match="not by a valid controller"):
        source.check(mint(agent, "j", "0123456789abcdef", "host-a", "host-b"), "0123456789abcdef", "host-b")
    deny.add(parse_target("controller:controller"))
    with pytest.raises(PermissionDenied, match="not by a valid controller"):
        source.check(mint(controller, "j", "0123456789abcdef", "host-a", "host-b"), "0123456789abcdef", "host-b")
    deny.replace([])
    tampered = json.loads(mint(controller, "j", "0123456789abcdef", "host-a", "host-b"))
    import base64
    body = json.loads(base64.b64decode(tampered["body"]))
    body["destination"] = "host-c"
    tampered["body"] = base64.b64encode(json.dumps(body, sort_keys=True).encode()).decode()
    with pytest.raises(PermissionDenied, match="signature does not verify"):
        source.check(json.dumps(tampered).encode(), "0123456789abcdef", "host-c")
    for garbage in (b"", b"{}", b"[1]", b'{"body": "!", "sig": "", "cert": ""}'):
        with pytest.raises(PermissionDenied):
            source.check(garbage, "0123456789abcdef", "host-b")
