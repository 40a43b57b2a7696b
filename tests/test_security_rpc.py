"""Authentication and authorization over real gRPC with real TLS, in process: the refusal matrix,
the audit log, certificate rotation under a live call, and fuzzed requests that must never crash a
server. The agent runs over a fake Runtime; the end-to-end suite covers podman behind it."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import os
import socket
import ssl
import tarfile
import threading

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from google.protobuf.descriptor import FieldDescriptor

from stasis.agent import bulk, transfer
from stasis.agent.runtime import ContainerInfo
from stasis.agent.server import build_server as build_agent
from stasis.agent.service import AgentService
from stasis.controller.server import build_server as build_controller
from stasis.controller.service import ControllerService
from stasis.controller.store import Store
from stasis.errors import IntegrityError
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.pki import Authority, agent_server_name
from stasis.security.provenance import Signer, Verifier
from stasis.security.revocation import DenyList
from stasis.security.tls import Transport
from stasis.storage.repository import Repository
from stasis.testbed.ports import free_port
from tests.test_agent_service import IMAGE_ID, PASSWORD, FakeRuntime

CONTROLLER = "controller.stasis"
NOW = dt.datetime.now(dt.timezone.utc)


class Stack:
    """A controller and an agent (fake runtime) on loopback with mutual TLS, in a background loop."""

    def __init__(self, base: str):
        self.ca = Authority.init(os.path.join(base, "pki"))
        for kind, name, role in (("controller", "controller", ""), ("agent", "host-a", ""), ("agent", "host-b", ""),
                                 ("user", "viewer", "viewer"), ("user", "operator", "operator"),
                                 ("user", "admin", "admin"), ("user", "mallory", "admin")):
            self.ca.issue(kind, name, role=role)
        repo = Repository.init(f"file://{base}/repo", PASSWORD)
        self.ctl_port, self.agent_port = free_port(), free_port()
        self.runtime = FakeRuntime()
        self.runtime.containers["web"] = ContainerInfo("c" * 64, "web", "localhost/x:1", IMAGE_ID, "running")
        agent_bundle = self.ca.bundle_path("agent", "host-a")
        agent_transport = Transport(agent_bundle)
        self.agent_deny = DenyList()
        self.agent = AgentService("host-a", self.runtime, os.path.join(base, "work"), repo.url, PASSWORD,
                                  signer=Signer(agent_bundle), deny=self.agent_deny,
                                  verifier=Verifier(agent_transport.ca_certs, self.agent_deny),
                                  transport=agent_transport)
        self.service = ControllerService(Store(os.path.join(base, "c.db")), repo,
                                         transport=Transport(self.ca.bundle_path("controller", "controller")))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def main():
            self.servers = [build_controller(self.service, f"127.0.0.1:{self.ctl_port}"),
                            build_agent(self.agent, f"127.0.0.1:{self.agent_port}", agent_transport)]
            for s in self.servers:
                await s.start()
            self.agent.bulk = bulk.Listener(agent_transport, "127.0.0.1:0", self.agent_deny)
            ready.set()
            await asyncio.gather(*(s.wait_for_termination() for s in self.servers))

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),), daemon=True)
        self.thread.start()
        assert ready.wait(30)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def stop(self):
        self.run(self.service.close())
        for s in self.servers:
            try:
                asyncio.run_coroutine_threadsafe(s.stop(0), self.loop).result(10)
            except TimeoutError:
                # grpc.aio's stop() now and then never returns once fuzzed streams were cancelled;
                # the loop's thread is a daemon and goes with the test process.
                pass

    def channel(self, bundle: str, port: int, server_name: str = CONTROLLER) -> grpc.Channel:
        return Transport(bundle).channel(f"127.0.0.1:{port}", server_name)

    def controller(self, user: str = "admin", bundle: str | None = None) -> pb_grpc.ControllerStub:
        return pb_grpc.ControllerStub(self.channel(bundle or self.ca.bundle_path("user", user), self.ctl_port))

    def agent_stub(self, bundle: str) -> pb_grpc.AgentStub:
        return pb_grpc.AgentStub(self.channel(bundle, self.agent_port, agent_server_name("host-a")))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(str(tmp_path_factory.mktemp("sec")))
    yield s
    s.stop()


def code_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


# ------------------------------------------------------------------ the refusal matrix

def test_transport_level_refusals(stack, tmp_path):
    """Callers who cannot complete a TLS handshake never reach a servicer."""
    other = Authority.init(str(tmp_path / "other"))
    foreign, _ = other.issue("user", "admin", role="admin")
    expired, _ = stack.ca.issue("user", "old", role="admin", out=str(tmp_path / "old"),
                                not_before=NOW - dt.timedelta(days=10), not_after=NOW - dt.timedelta(days=1))
    no_cert = pb_grpc.ControllerStub(grpc.secure_channel(
        f"127.0.0.1:{stack.ctl_port}", grpc.ssl_channel_credentials(stack.ca.cert.public_bytes(Encoding.PEM)),
        options=[("grpc.ssl_target_name_override", CONTROLLER)]))
    plaintext = pb_grpc.ControllerStub(grpc.insecure_channel(f"127.0.0.1:{stack.ctl_port}"))
    for stub in (no_cert, plaintext, stack.controller(bundle=foreign), stack.controller(bundle=expired)):
        assert code_of(lambda s=stub: s.ListHosts(pb.ListHostsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE
    # A server that is not the controller (host-a's agent) fails the client's name check.
    impostor = pb_grpc.ControllerStub(stack.channel(stack.ca.bundle_path("user", "admin"), stack.agent_port))
    assert code_of(lambda: impostor.ListHosts(pb.ListHostsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("user,method,request_,code", [
    ("viewer", "ListHosts", pb.ListHostsRequest(), grpc.StatusCode.OK),
    ("viewer", "Migrate", pb.MigrateRequest(host="host-a", container="web", to="host-b"),
     grpc.StatusCode.PERMISSION_DENIED),
    ("viewer", "CreateSchedule", pb.Schedule(name="s", selector="web", every_seconds=60),
     grpc.StatusCode.PERMISSION_DENIED),
    ("operator", "Forget", pb.ForgetRequest(schedule="x", prune=True), grpc.StatusCode.PERMISSION_DENIED),
    ("operator", "ListAudit", pb.ListAuditRequest(), grpc.StatusCode.PERMISSION_DENIED),
    ("operator", "Revoke", pb.RevokeRequest(target="user:viewer"), grpc.StatusCode.PERMISSION_DENIED),
    ("operator", "Checkpoint", pb.CheckpointRequest(host="nohost", container="web"), grpc.StatusCode.NOT_FOUND),
    ("admin", "ListAudit", pb.ListAuditRequest(), grpc.StatusCode.OK),
    ("admin", "Migrate", pb.MigrateRequest(host="host-a", container="web", to="Host_B"),
     grpc.StatusCode.INVALID_ARGUMENT),
])
def test_roles(stack, user, method, request_, code):
    stub = stack.controller(user)
    assert code_of(lambda: getattr(stub, method)(request_, timeout=10)) == code


def test_daemons_are_not_users_and_agents_speak_only_for_themselves(stack):
    as_agent = stack.controller(bundle=stack.ca.bundle_path("agent", "host-b"))
    assert code_of(lambda: as_agent.ListHosts(pb.ListHostsRequest(), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    err = None
    try:
        as_agent.RegisterAgent(pb.RegisterAgentRequest(name="host-a", address="127.0.0.1:1"), timeout=5)
    except grpc.RpcError as e:
        err = e
    assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED and "host-a" in err.details()
    reply = as_agent.RegisterAgent(pb.RegisterAgentRequest(name="host-b", address="127.0.0.1:1"), timeout=5)
    assert reply.repository


def test_agents_serve_the_controller_only(stack):
    ctl = stack.agent_stub(stack.ca.bundle_path("controller", "controller"))
    assert ctl.GetHostInfo(pb.GetHostInfoRequest(), timeout=30).name == "host-a"
    for bundle in (stack.ca.bundle_path("user", "admin"), stack.ca.bundle_path("agent", "host-b")):
        stub = stack.agent_stub(bundle)
        assert code_of(lambda s=stub: s.ListContainers(pb.ListContainersRequest(), timeout=5)) == \
            grpc.StatusCode.PERMISSION_DENIED
    assert stack.runtime.calls == [] or "remove" not in stack.runtime.calls


def test_revocation_applies_to_the_next_call(stack):
    mallory = stack.controller("mallory")
    assert mallory.WhoAmI(pb.WhoAmIRequest(), timeout=5).principal == "user:mallory"
    stack.controller("admin").Revoke(pb.RevokeRequest(target="user:mallory", reason="left"), timeout=5)
    err = None
    try:
        mallory.WhoAmI(pb.WhoAmIRequest(), timeout=5)
    except grpc.RpcError as e:
        err = e
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details()
    revs = stack.controller("admin").ListRevocations(pb.ListRevocationsRequest(), timeout=5).revocations
    assert [r.principal for r in revs] == ["user:mallory"]
    # The agent enforces what the controller hands it at heartbeat (here: directly).
    from stasis.proto import convert
    ctl_serial = Transport(stack.ca.bundle_path("controller", "controller")).identity.serial
    stack.agent_deny.replace([convert.revocation(r) for r in revs] + [convert.revocation(
        pb.Revocation(serial=f"{ctl_serial:x}"))])
    ctl = stack.agent_stub(stack.ca.bundle_path("controller", "controller"))
    try:
        assert code_of(lambda: ctl.ListContainers(pb.ListContainersRequest(), timeout=5)) == \
            grpc.StatusCode.UNAUTHENTICATED
    finally:
        stack.agent_deny.replace([])


def test_audit_records_who_did_what_and_never_hook_commands(stack):
    op = stack.controller("operator")
    op.CreateSchedule(pb.Schedule(name="audited", selector="host-a/web", every_seconds=3600,
                                  pre_hook="echo s3cr3t-token"), timeout=10)
    code_of(lambda: stack.controller("viewer").DeleteSchedule(pb.ScheduleName(name="audited"), timeout=5))
    entries = stack.controller("admin").ListAudit(pb.ListAuditRequest(limit=1000), timeout=5).entries
    create = [e for e in entries if e.method == "CreateSchedule" and e.target.get("name") == "audited"]
    assert create and create[0].principal == "user:operator" and create[0].code == "OK"
    denied = [e for e in entries if e.method == "DeleteSchedule" and e.principal == "user:viewer"]
    assert denied and denied[0].code == "PERMISSION_DENIED" and "lacks role operator" in denied[0].message
    assert all("s3cr3t" not in str(e) for e in entries)
    mine = stack.controller("admin").ListAudit(pb.ListAuditRequest(principal="user:viewer"), timeout=5).entries
    assert mine and {e.principal for e in mine} == {"user:viewer"}


def test_a_peer_agent_fetches_a_held_checkpoint_once_and_only_with_its_ticket(stack):
    from stasis.security.tickets import mint

    ctl = stack.agent_stub(stack.ca.bundle_path("controller", "controller"))
    events = list(ctl.Checkpoint(pb.AgentCheckpointRequest(operation_id="direct-1", container="web",
                                                           direct=True), timeout=60))
    summary = events[-1].checkpoint
    stack.runtime.containers["web"].state = "running"   # the dump stopped it; later tests need it
    assert summary.size_bytes > 100_000
    controller = Transport(stack.ca.bundle_path("controller", "controller"))
    ticket = mint(controller, "job-1", summary.id, "host-a", "host-b")
    peer = stack.agent_stub(stack.ca.bundle_path("agent", "host-b"))

    def fetch(stub, t):
        return list(stub.FetchCheckpoint(pb.FetchCheckpointRequest(checkpoint_id=summary.id, ticket=t), timeout=30))

    def refused(stub, t) -> str:
        with pytest.raises(grpc.RpcError) as err:
            fetch(stub, t)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        return err.value.details()

    assert "not 'host-c'" in refused(pb_grpc.AgentStub(stack.channel(
        stack.ca.issue("agent", "host-c")[0], stack.agent_port, agent_server_name("host-a"))), ticket)
    assert "migration ticket refused" in refused(peer, b"")
    assert "users may not" in refused(stack.agent_stub(stack.ca.bundle_path("user", "admin")), ticket)
    assert "may not call" in refused(ctl, ticket)       # not even the controller fetches
    chunks = fetch(peer, ticket)
    assert chunks[0].HasField("offer") and chunks[-1].HasField("seal")
    assert sum(len(c.data) for c in chunks) == summary.size_bytes
    assert "used before (a replay)" in refused(peer, ticket)
    # A fresh ticket finds nothing: a fetched archive leaves the source's spool.
    with pytest.raises(grpc.RpcError) as err:
        fetch(peer, mint(controller, "job-1", summary.id, "host-a", "host-b"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def tar_dumps(original):
    """The fake runtime's checkpoint, writing an archive of a real one's shape (3 MiB)."""
    async def dump_tar(name, archive, leave_running, ignore_volumes=False):
        stats = await original(name, archive, leave_running, ignore_volumes)
        with tarfile.open(archive, "w") as tar:
            for member, size in (("inventory.img", 100), ("pages-1.img", 3 << 20)):
                info = tarfile.TarInfo(member)
                info.size = size
                tar.addfile(info, io.BytesIO(os.urandom(size)))
        return stats
    return dump_tar


def test_a_peer_receives_over_the_bulk_channel_and_the_seal_still_judges_the_bytes(stack, tmp_path):
    """Receiver and send() over real gRPC and real mutual TLS: the bytes take the bulk channel; a
    byte damaged on it is caught by the seal that came over gRPC."""
    from stasis.security.tickets import mint

    ctl = stack.agent_stub(stack.ca.bundle_path("controller", "controller"))
    controller = Transport(stack.ca.bundle_path("controller", "controller"))
    b = Transport(stack.ca.bundle_path("agent", "host-b"))

    original = stack.runtime.checkpoint
    dump_tar = tar_dumps(original)

    def receive(n: int):
        events = list(ctl.Checkpoint(pb.AgentCheckpointRequest(operation_id=f"bulk-{n}", container="web",
                                                               direct=True), timeout=60))
        stack.runtime.containers["web"].state = "running"
        ckpt = events[-1].checkpoint.id
        ticket = mint(controller, f"job-bulk-{n}", ckpt, "host-a", "host-b")
        progress: list[int] = []

        async def run():
            receiver = transfer.Receiver(b, Verifier(b.ca_certs, DenyList()), "host-a",
                                         f"127.0.0.1:{stack.agent_port}", ckpt, ticket)
            await receiver.offer()
            seal = await receiver.archive(str(tmp_path / f"{n}.tar"), progress.append)
            return receiver.channel_used, seal

        return events[-1].checkpoint, progress, asyncio.run(run())

    stack.runtime.checkpoint = dump_tar
    try:
        summary, progress, (channel, seal) = receive(1)
        assert channel == "bulk" and seal["size"] == summary.size_bytes == os.path.getsize(tmp_path / "1.tar")
        assert summary.size_bytes > 3 << 20 and progress[-1] == summary.size_bytes
        os.environ["STASIS_FAILPOINTS"] = "transfer.corrupt_byte"   # in the pages, past the first chunk
        with pytest.raises(IntegrityError, match="damaged in transit"):
            receive(2)
    finally:
        os.environ.pop("STASIS_FAILPOINTS", None)
        stack.runtime.checkpoint = original


def test_a_peer_that_cannot_reach_the_bulk_channel_declines_it_and_gets_the_bytes_at_once(stack, tmp_path,
                                                                                          monkeypatch):
    """The fetcher's dial fails (a firewall, say): it declines the channel over gRPC, with its spent
    ticket and the offer's token, and the source sends on the stream at once instead of waiting out
    BULK_WAIT (ten minutes here)."""
    from stasis.agent import bulk
    from stasis.security.tickets import mint

    monkeypatch.setattr(transfer, "BULK_WAIT", 600.0)

    def unreachable(*_args, **_kwargs):
        raise bulk.Unavailable("cannot connect to the source's bulk port (Connection refused)")

    monkeypatch.setattr(bulk, "dial", unreachable)
    monkeypatch.setattr(stack.runtime, "checkpoint", tar_dumps(stack.runtime.checkpoint))
    ctl = stack.agent_stub(stack.ca.bundle_path("controller", "controller"))
    controller = Transport(stack.ca.bundle_path("controller", "controller"))
    b = Transport(stack.ca.bundle_path("agent", "host-b"))
    events = list(ctl.Checkpoint(pb.AgentCheckpointRequest(operation_id="decline-1", container="web",
                                                           direct=True), timeout=60))
    stack.runtime.containers["web"].state = "running"
    summary = events[-1].checkpoint
    ticket = mint(controller, "job-decline", summary.id, "host-a", "host-b")

    async def run():
        receiver = transfer.Receiver(b, Verifier(b.ca_certs, DenyList()), "host-a",
                                     f"127.0.0.1:{stack.agent_port}", summary.id, ticket)
        await receiver.offer()
        seal = await asyncio.wait_for(receiver.archive(str(tmp_path / "declined.tar"), lambda _n: None), 60)
        return receiver.channel_used, seal

    channel, seal = asyncio.run(run())
    assert channel == "grpc" and seal["size"] == summary.size_bytes == os.path.getsize(tmp_path / "declined.tar")


# ------------------------------------------------------------------ rotation

def presented_serial(port: int, server_name: str, bundle: str) -> int:
    """The serial of the certificate a server presents to a new connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(os.path.join(bundle, "ca.crt"))
    ctx.load_cert_chain(os.path.join(bundle, "tls.crt"), os.path.join(bundle, "tls.key"))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number


def test_rotation_keeps_live_calls_and_new_connections_get_the_new_certificate(stack):
    ctl_bundle = stack.ca.bundle_path("controller", "controller")
    before = presented_serial(stack.agent_port, agent_server_name("host-a"), ctl_bundle)
    original = stack.runtime.checkpoint

    async def slow_checkpoint(name, archive, leave_running, ignore_volumes=False):
        await asyncio.sleep(1.5)
        return await original(name, archive, leave_running, ignore_volumes)

    stack.runtime.checkpoint = slow_checkpoint
    try:
        stub = stack.agent_stub(ctl_bundle)
        events = stub.Checkpoint(pb.AgentCheckpointRequest(operation_id="rot-1", container="web",
                                                           leave_running=True), timeout=60)
        first = next(events)                       # the call is live
        _, agent_new = stack.ca.issue("agent", "host-a")     # rotate both ends mid-call
        _, ctl_new = stack.ca.issue("controller", "controller")
        rest = list(events)
        assert first.HasField("progress") and rest[-1].HasField("checkpoint")
    finally:
        stack.runtime.checkpoint = original
    after = presented_serial(stack.agent_port, agent_server_name("host-a"), ctl_bundle)
    assert before != after == agent_new.serial
    assert presented_serial(stack.ctl_port, CONTROLLER, stack.ca.bundle_path("user", "admin")) == ctl_new.serial
    # The new checkpoint is signed with the new agent key and restores (verification passes).
    ctl = stack.agent_stub(ctl_bundle)
    restored = list(ctl.Restore(pb.AgentRestoreRequest(operation_id="rot-2", checkpoint_id=rest[-1].checkpoint.id,
                                                       name="web-copy"), timeout=60))
    assert restored[-1].restored.container.name == "web-copy"


# ------------------------------------------------------------------ fuzzing

def _scalar(field: FieldDescriptor):
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=40), st.sampled_from(
            ["host-a", "web", "0123456789abcdef", "../../etc/passwd", "a" * 3000, "user:admin", "x/y", "-rf"]))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(1 << 31), (1 << 31) - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(1 << 63), (1 << 63) - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, (1 << 32) - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, (1 << 64) - 1)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    raise AssertionError(f"no strategy for field type {t}")


def messages(descriptor, depth: int = 0):
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    fields = {}
    for f in descriptor.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            if value.message_type is not None:
                continue
            fields[f.name] = st.dictionaries(_scalar(key), _scalar(value), max_size=3)
        elif f.message_type is not None:
            if depth >= 2:
                continue
            inner = messages(f.message_type, depth + 1)
            fields[f.name] = st.lists(inner, max_size=2) if f.is_repeated else inner
        else:
            fields[f.name] = st.lists(_scalar(f), max_size=4) if f.is_repeated else _scalar(f)
    return st.fixed_dictionaries({}, optional=fields).map(lambda kw: cls(**kw))


NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DEADLINE_EXCEEDED}


def _fuzz(stub, service_name: str, method: str, data):
    m = pb.DESCRIPTOR.services_by_name[service_name].methods_by_name[method]
    request = data.draw(messages(m.input_type))
    call = getattr(stub, method)
    try:
        if m.client_streaming:   # a relay: a few fuzzed messages in a row
            request = data.draw(st.lists(messages(m.input_type), min_size=1, max_size=3))
        result = call(iter(request) if m.client_streaming else request, timeout=20)
        if m.server_streaming:
            for _ in result:
                pass
    except grpc.RpcError as err:
        assert err.code() not in NEVER, f"{method}({request}) -> {err.code()}: {err.details()}"


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("method", [m.name for m in pb.DESCRIPTOR.services_by_name["Controller"].methods
                                    if m.name not in ("Revoke",)])
@FUZZ
@given(data=st.data())
def test_fuzzed_controller_requests_never_crash(stack, method, data):
    _fuzz(stack.controller("admin"), "Controller", method, data)


@pytest.mark.parametrize("method", [m.name for m in pb.DESCRIPTOR.services_by_name["Agent"].methods
                                    if m.name != "RemoveContainer"])
@FUZZ
@given(data=st.data())
def test_fuzzed_agent_requests_never_crash(stack, method, data):
    _fuzz(stack.agent_stub(stack.ca.bundle_path("controller", "controller")), "Agent", method, data)


@FUZZ
@given(data=st.data())
def test_fuzzed_revocations_never_crash(stack, data):
    # Only well-shaped targets get past the limits; make sure they never lock the admin out.
    request = data.draw(messages(pb.RevokeRequest.DESCRIPTOR))
    if request.target.startswith("user:admin"):
        return
    code = code_of(lambda: stack.controller("admin").Revoke(request, timeout=10))
    assert code not in NEVER
