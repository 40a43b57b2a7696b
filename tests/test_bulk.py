"""The bulk channel (agent/bulk.py) over real sockets and real mutual TLS: who may connect, what a
dialer must show, and how malformed frames are refused."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import pytest

from stasis.agent import bulk
from stasis.errors import IntegrityError, PermissionDenied
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.security.pki import Authority, agent_server_name
from stasis.security.revocation import DenyList
from stasis.security.tls import Transport
from stasis.proto import convert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca = Authority.init(str(tmp_path_factory.mktemp("pki") / "ca"))
    for name in ("host-a", "host-b", "host-c"):
        ca.issue("agent", name)
    stranger = Authority.init(str(tmp_path_factory.mktemp("pki") / "other"))
    stranger.issue("agent", "host-b")
    return ca, stranger


def agent(ca: Authority, name: str) -> Transport:
    return Transport(ca.bundle_path("agent", name))


@pytest.fixture
def listener(pki):
    """host-a's listener, with a deny list of its own."""
    source = bulk.Listener(agent(pki[0], "host-a"), "127.0.0.1:0", DenyList())
    yield source
    source.close()


async def connect(listener: bulk.Listener, dialer: Transport, expect: str, shown: bytes | None = None,
                  server: str = "host-a"):
    """(the dialer's socket or its error, the waiting transfer's socket or error)."""
    token = secrets.token_bytes(bulk.TOKEN)
    waiting = listener.expect(token, expect)
    try:
        dialed = await asyncio.to_thread(bulk.dial, dialer, "127.0.0.1", listener.port, agent_server_name(server),
                                         shown or token)
    except bulk.Unavailable as e:
        dialed = e
    try:
        got = await bulk.accepted(listener, token, waiting, 0.5)
    except PermissionDenied as e:
        got = e
    return dialed, got


async def test_the_expected_agent_with_the_token_gets_a_channel_that_carries_frames(pki, listener):
    ca, _ = pki
    dialed, got = await connect(listener, agent(ca, "host-b"), "host-b")
    assert isinstance(got, socket.socket) and isinstance(dialed, socket.socket)
    payload = os.urandom(bulk.MAX_FRAME)

    def send():
        bulk.send_frame(got, bulk.KEEPALIVE)
        bulk.send_frame(got, bulk.DATA, payload)
        bulk.send_frame(got, bulk.ZSTD, b"z" * 10)
        bulk.send_frame(got, bulk.END)

    sender = asyncio.ensure_future(asyncio.to_thread(send))
    frames = await asyncio.to_thread(lambda: list(bulk.frames(dialed, "agent host-a")))
    await sender
    assert frames == [(bulk.DATA, payload), (bulk.ZSTD, b"z" * 10)]
    bulk.shut(got)
    bulk.shut(dialed)


async def test_the_right_token_from_another_agent_stops_the_transfer(pki, listener):
    ca, _ = pki
    dialed, got = await connect(listener, agent(ca, "host-c"), "host-b")
    assert isinstance(got, PermissionDenied) and "agent:host-c" in str(got) and "agent:host-b" in str(got)
    # The dialer learns nothing but a closed channel.
    with pytest.raises(bulk.Unavailable):
        list(bulk.frames(dialed, "agent host-a"))


async def test_a_wrong_token_or_a_revoked_or_foreign_certificate_gets_nothing(pki, listener):
    ca, stranger = pki
    dialed, got = await connect(listener, agent(ca, "host-b"), "host-b", shown=b"x" * bulk.TOKEN)
    assert got is None
    with pytest.raises(bulk.Unavailable):
        list(bulk.frames(dialed, "agent host-a"))
    # A certificate from another CA fails the handshake: the server never reads a token.
    foreign = Transport(stranger.bundle_path("agent", "host-b"))
    dialed, got = await connect(listener, foreign, "host-b")
    assert got is None
    if isinstance(dialed, socket.socket):   # TLS 1.3: the client may finish before the server refuses
        with pytest.raises(bulk.Unavailable):
            list(bulk.frames(dialed, "agent host-a"))
    b = agent(ca, "host-b")
    listener.deny.replace([convert.revocation(pb.Revocation(serial=f"{b.identity.serial:x}"))])
    dialed, got = await connect(listener, b, "host-b")
    assert isinstance(got, PermissionDenied) and "revoked" in str(got)


async def test_the_dialer_checks_the_source_is_the_agent_it_meant(pki, listener):
    ca, _ = pki
    dialed, got = await connect(listener, agent(ca, "host-b"), "host-b", server="host-c")
    assert isinstance(dialed, bulk.Unavailable) and "TLS" in str(dialed) and got is None
    with pytest.raises(IntegrityError, match="malformed bulk channel"):
        bulk.dial(agent(ca, "host-b"), "127.0.0.1", 0, agent_server_name("host-a"), b"t" * bulk.TOKEN)
    with pytest.raises(bulk.Unavailable, match="cannot connect"):
        bulk.dial(agent(ca, "host-b"), "127.0.0.1", 1, agent_server_name("host-a"), b"t" * bulk.TOKEN)


@pytest.mark.parametrize("header,problem", [
    (bulk.HEADER.pack(9, 10), "malformed bulk frame"),
    (bulk.HEADER.pack(bulk.DATA, 0), "malformed bulk frame"),
    (bulk.HEADER.pack(bulk.DATA, bulk.MAX_FRAME + 1), "malformed bulk frame"),
    (bulk.HEADER.pack(bulk.DATA, 100) + b"short", "broke mid-transfer"),
])
def test_malformed_or_broken_frames_are_refused_in_one_line(header, problem):
    a, b = socket.socketpair()
    try:
        bulk.send_frame(a, bulk.DATA, b"fine")
        a.sendall(header)
        a.shutdown(socket.SHUT_WR)
        got = []
        with pytest.raises(IntegrityError, match=problem) as err:
            for frame in bulk.frames(b, "agent host-a"):
                got.append(frame)
        assert got == [(bulk.DATA, b"fine")] and "\n" not in str(err.value)
    finally:
        a.close()
        b.close()


def test_plaintext_is_for_loopback_only():
    with pytest.raises(Exception, match="loopback only"):
        bulk.Listener(Transport.insecure(), "0.0.0.0:0")
    listener = bulk.Listener(Transport.insecure(), "127.0.0.1:0")
    listener.close()


async def test_a_fetcher_that_cannot_connect_declines_and_the_transfer_uses_grpc_at_once(listener):
    token = secrets.token_bytes(bulk.TOKEN)
    waiting = listener.expect(token, "host-b")
    await asyncio.to_thread(listener.decline, token, "host-b", "cannot connect (Connection refused)")
    # The transfer's own deadline is ten minutes: only the decline can end the wait this soon.
    assert await asyncio.wait_for(bulk.accepted(listener, token, waiting, 600), 10) is None
    listener.decline(token, "host-b", "again")   # nothing waits any more: nothing happens


async def test_the_right_token_declined_by_another_agent_stops_the_transfer(listener):
    token = secrets.token_bytes(bulk.TOKEN)
    waiting = listener.expect(token, "host-b")
    with pytest.raises(PermissionDenied, match="agent:host-c declined"):
        await asyncio.to_thread(listener.decline, token, "host-c", "")
    with pytest.raises(PermissionDenied, match="transfer to agent:host-b"):
        await asyncio.wait_for(bulk.accepted(listener, token, waiting, 600), 10)


def test_a_port_that_drops_the_connect_fails_the_dial_after_the_connect_timeout(pki, monkeypatch):
    """A firewall that drops packets, rather than refusing them, leaves a connect hanging: the dial
    gives up after CONNECT_TIMEOUT, not the handshake's longer one, so the destination declines the
    channel soon. On loopback a full accept queue drops further SYNs the same way."""
    monkeypatch.setattr(bulk, "CONNECT_TIMEOUT", 0.5)
    black = socket.socket()
    black.bind(("127.0.0.1", 0))
    black.listen(0)
    queued = socket.create_connection(black.getsockname(), timeout=5)   # fills the queue, never accepted
    try:
        started = time.monotonic()
        with pytest.raises(bulk.Unavailable, match="cannot connect to 127.0.0.1"):
            bulk.dial(agent(pki[0], "host-b"), "127.0.0.1", black.getsockname()[1], agent_server_name("host-a"),
                      secrets.token_bytes(bulk.TOKEN))
        assert time.monotonic() - started < bulk.HANDSHAKE_TIMEOUT / 2
    finally:
        queued.close()
        black.close()
