"""The bulk channel: a direct transfer's bytes over one mutually authenticated TLS connection beside
gRPC, which keeps the offer, the ticket and the seal.

Why: HTTP/2 framing in grpcio costs about twice the CPU of a plain TLS socket for the same bytes,
and on a host where CRIU is dumping at the same time that CPU is the transfer's speed. Measured
here, 1 GiB over loopback with TLS 1.3, hashed and written on arrival: gRPC aio 3.7-4.9 s wall and
4.3-5.5 CPU-s, this channel 1.6-2.7 s and 2.5-3.2 CPU-s.

The source holds one listener (`Listener`); each transfer registers a random token and the agent it
expects, and announces port and token inside the authenticated gRPC stream. The destination dials
the port on the host of the source's gRPC address, proves its agent certificate and sends the
token. Sockets are blocking and driven from threads: the ssl module releases the GIL while it
encrypts, so the two agents' threads, CRIU and the disk all run at once.

On the wire, after the token: frames of a 5-byte header (kind, length) and a payload; an END frame
closes the archive, so a connection that breaks is never taken for a short archive.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import struct
import threading
import time
from typing import Iterator

import structlog
from cryptography import x509

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument, PermissionDenied
from stasis.security.pki import identity_of
from stasis.security.revocation import DenyList
from stasis.security.tls import Material, Transport, is_loopback

log = structlog.get_logger("stasis.agent")
HEADER = struct.Struct(">BI")
DATA, ZSTD, END, KEEPALIVE = 0, 1, 2, 3   # KEEPALIVE: the dump is slow, the source still there
TOKEN = 32                # bytes
MAX_FRAME = (1 << 20) + (1 << 16)   # one chunk, or its zstd frame (never much larger: see transfer._frame)
HANDSHAKE_TIMEOUT = 10.0  # seconds a dialer has to prove itself and present its token
# Seconds the destination's TCP connect may take. Agents are meant to reach each other directly, where
# a connect takes milliseconds; 3 s allows a lost SYN's retransmission (1 s). A firewall that drops the
# port instead of refusing it then costs 3 s of downtime before the bytes go over gRPC, not 10.
CONNECT_TIMEOUT = 3.0
IDLE_TIMEOUT = 60.0       # seconds without a byte after which the peer is taken for gone
KEEPALIVE_EVERY = 5.0     # seconds the source may wait on the dump before it says it is still there
MAX_ADMITTING = 16        # handshakes at once: more are dropped, so a flood cannot pin threads


class Unavailable(Exception):
    """The channel could not be set up; the transfer goes over gRPC instead."""


class _Contexts:
    """TLS contexts from the agent's bundle, remade when the bundle rotates. The key goes to OpenSSL
    through a memfd: the ssl module loads keys from paths only, and this writes no copy to disk."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self._made: dict[bool, tuple[Material, ssl.SSLContext]] = {}
        self._lock = threading.Lock()

    def get(self, server: bool) -> ssl.SSLContext | None:
        if not self.transport.secure:
            return None
        material = self.transport.material()
        with self._lock:
            made = self._made.get(server)
            if made is None or made[0] is not material:
                made = self._made[server] = (material, _context(material, server))
            return made[1]


def _context(m: Material, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED   # both ways: the CA's agents only
    ctx.load_verify_locations(cadata=m.ca.decode())
    fd = os.memfd_create("stasis-bulk-tls", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(m.cert + b"\n" + m.key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def host_of(address: str) -> str:
    return _split(address)[0]


class Listener:
    """The source's end: accepts dialers in a thread and hands each one, once it has proved to be the
    agent a transfer expects and shown that transfer's token, to the transfer waiting for it."""

    def __init__(self, transport: Transport, address: str, deny: DenyList | None = None):
        host, port = _split(address)
        if not transport.secure and not is_loopback(address):
            raise InvalidArgument(f"--insecure serves plaintext on loopback only, not the bulk address {address}")
        try:
            self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                             backlog=MAX_ADMITTING)
        except OSError as e:
            raise FailedPrecondition(f"cannot listen for direct transfers on {address} ({e.strerror}): "
                                     f"choose another --bulk-listen") from None
        self.port: int = self.sock.getsockname()[1]
        self.transport, self.deny = transport, deny or DenyList()
        self._contexts = _Contexts(transport)
        # sha256(token) -> (the agent expected, its loop, the future that gets the socket)
        self._waiting: dict[bytes, tuple[str, asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_ADMITTING)
        self._closed = False
        threading.Thread(target=self._accept, name="stasis-bulk-accept", daemon=True).start()

    def expect(self, token: bytes, peer: str) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        waiting = loop.create_future()
        with self._lock:
            self._waiting[hashlib.sha256(token).digest()] = (peer, loop, waiting)
        return waiting

    def decline(self, token: bytes, peer: str, reason: str) -> None:
        """The fetcher `peer` cannot connect: the transfer waiting for `token` uses gRPC now. The
        right token from another agent stops that transfer, as on the channel itself."""
        with self._lock:
            entry = self._waiting.pop(hashlib.sha256(token).digest(), None)
        if entry is None:
            return   # connected, already given up on, or never offered: nothing waits
        expected, loop, waiting = entry
        if peer != expected:
            why = PermissionDenied(f"agent:{peer} declined the bulk channel of a transfer to agent:{expected}; "
                                   f"refusing the transfer")
            loop.call_soon_threadsafe(_settle, waiting, None, why)
            raise why
        log.warning("the peer cannot reach the bulk channel; sending over gRPC (slower): let agents reach "
                    "each other's --bulk-listen port", peer=peer, port=self.port, reason=reason[:300])
        loop.call_soon_threadsafe(_settle, waiting, None, None)

    def forget(self, token: bytes) -> None:
        with self._lock:
            self._waiting.pop(hashlib.sha256(token).digest(), None)

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)   # wakes the accepting thread
        except OSError:
            pass
        self.sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:   # out of descriptors, say: do not spin
                time.sleep(0.1)
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._admit, args=(conn,), name="stasis-bulk-admit", daemon=True).start()

    def _admit(self, conn: socket.socket) -> None:
        where, sock = "unidentified", conn
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            where = "%s:%s" % conn.getpeername()[:2]
            ctx = self._contexts.get(server=True)
            sock = ctx.wrap_socket(conn, server_side=True) if ctx else conn
            ident = None
            if ctx is not None:
                ident = identity_of(x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)))
                where = f"{ident.principal} at {where}"
            token = bytearray(TOKEN)
            recv_exact(sock, memoryview(token))
            with self._lock:
                entry = self._waiting.pop(hashlib.sha256(token).digest(), None)
            if entry is None:
                raise PermissionDenied("no transfer waits for the token it showed")
            peer, loop, waiting = entry
            why = None
            if ident is not None and (ident.kind != "agent" or ident.name != peer):
                # The right token from the wrong agent: it leaked. The transfer stops.
                why = PermissionDenied(f"{where} presented the bulk token of a transfer to agent:{peer}; "
                                       f"refusing the transfer")
            elif ident is not None and self.deny.denied(ident) is not None:
                why = PermissionDenied(f"the certificate of {where} (serial {ident.serial:x}) is revoked; "
                                       f"refusing the transfer")
            if why is not None:
                loop.call_soon_threadsafe(_settle, waiting, None, why)
                raise why
            sock.settimeout(IDLE_TIMEOUT)
            loop.call_soon_threadsafe(_settle, waiting, sock, None)
        except (OSError, ValueError, FailedPrecondition, PermissionDenied, IntegrityError) as e:
            log.warning("bulk connection refused", peer=where, error=str(e) or type(e).__name__)
            sock.close()
            conn.close()
        finally:
            self._slots.release()


def _settle(waiting: asyncio.Future, sock, error) -> None:
    """The transfer's outcome: the socket, None (use gRPC) or the error that stops it."""
    if waiting.done():   # the transfer stopped waiting: nobody will use the socket
        if sock is not None:
            sock.close()
    elif error is not None:
        waiting.set_exception(error)
    else:
        waiting.set_result(sock)


async def accepted(listener: Listener, token: bytes, waiting: asyncio.Future, timeout: float):
    """The dialer's socket, or None when it did not come in time or declined (the transfer then uses gRPC)."""
    try:
        return await asyncio.wait_for(waiting, timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        listener.forget(token)


def dial(transport: Transport, host: str, port: int, server_name: str, token: bytes,
         timeout: float = HANDSHAKE_TIMEOUT) -> socket.socket:
    """The destination's end: connect, prove this agent, show the token. Unavailable if it cannot."""
    if len(token) != TOKEN or not 0 < port < 65536:
        raise IntegrityError(f"the source offered a malformed bulk channel (port {port})")
    try:
        raw = socket.create_connection((host, port), timeout=min(timeout, CONNECT_TIMEOUT))
    except OSError as e:
        raise Unavailable(f"cannot connect to {host}:{port} ({e.strerror or e})") from None
    try:
        raw.settimeout(timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = _Contexts(transport).get(server=False)
        sock = ctx.wrap_socket(raw, server_hostname=server_name) if ctx else raw
        sock.sendall(token)
        sock.settimeout(IDLE_TIMEOUT)
        return sock
    except (OSError, ssl.SSLError) as e:
        raw.close()
        raise Unavailable(f"TLS with {host}:{port} failed ({e})") from None


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        got = sock.recv_into(view)
        if not got:
            raise ConnectionResetError("the connection closed mid-frame")
        view = view[got:]


def send_frame(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    sock.sendall(HEADER.pack(kind, len(payload)))
    if payload:
        sock.sendall(payload)


def frames(sock: socket.socket, peer: str) -> Iterator[tuple[int, bytearray]]:
    """(kind, payload) of each frame up to END. The first header's absence is Unavailable (the
    source refused or gave up on this channel); anything else malformed is an IntegrityError."""
    header = bytearray(HEADER.size)
    first = True
    while True:
        try:
            recv_exact(sock, memoryview(header))
        except OSError as e:
            if first:
                raise Unavailable(f"{peer} closed the bulk channel before sending ({e})") from None
            raise IntegrityError(f"the bulk channel from {peer} broke mid-transfer ({e})") from None
        first = False
        kind, length = HEADER.unpack(header)
        if kind == END and length == 0:
            return
        if kind == KEEPALIVE and length == 0:
            continue
        if kind not in (DATA, ZSTD) or not 0 < length <= MAX_FRAME:
            raise IntegrityError(f"{peer} sent a malformed bulk frame (kind {kind}, {length} bytes); refusing it")
        payload = bytearray(length)
        try:
            recv_exact(sock, memoryview(payload))
        except OSError as e:
            raise IntegrityError(f"the bulk channel from {peer} broke mid-transfer ({e})") from None
        yield kind, payload


def shut(sock: socket.socket | None) -> None:
    """Unblock a thread in sock's recv or send, then close it."""
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
