"""Post-copy memory, relayed between agents over their mutually authenticated channel.

CRIU's page server (source) and lazy-pages daemon (destination) speak plaintext TCP. Both are
kept on loopback; the agents carry the bytes between them in a RelayPages stream, so memory never
crosses the network unencrypted and only the peer the controller's ticket names can ask for it.

An early EOF on the page server's socket tells CRIU that every page was taken: it would then kill
the source while the destination still lacks pages. So the stream says explicitly when the
destination's daemon ended well (`end`); any other ending aborts the dump, which resumes the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import AsyncIterator, Awaitable, Callable

import grpc
import structlog

from stasis.errors import IntegrityError, from_rpc_error
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.pki import agent_server_name
from stasis.security.tls import Transport

log = structlog.get_logger("stasis.agent")
CHUNK = 1 << 20


def free_loopback_port() -> int:
    """A port for CRIU's page server; CRIU binds it a moment later (runc.conf: address 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def serve_source(requests: AsyncIterator[pb.PageBytes], port: int,
                       abort: Callable[[], Awaitable[bool]]) -> AsyncIterator[pb.PageBytes]:
    """The source's end: the page server on 127.0.0.1:`port` <-> the peer's stream (first message
    already taken by the caller)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ended = False

    async def upstream() -> None:
        nonlocal ended
        async for msg in requests:
            if msg.end:   # now, and only now, CRIU may read EOF: every page was taken
                ended = True
                writer.write_eof()
                return
            writer.write(msg.data)
            await writer.drain()

    up = asyncio.ensure_future(upstream())
    read = None
    try:
        while True:
            read = read or asyncio.ensure_future(reader.read(CHUNK))
            await asyncio.wait([read] if up.done() else [read, up], return_when=asyncio.FIRST_COMPLETED)
            if up.done():
                up.result()   # the peer's side broke: raise
                if not ended:
                    raise IntegrityError("the peer agent closed the memory relay before its daemon finished")
            if read.done():
                data, read = read.result(), None
                if not data:   # CRIU is done: after `end`, every page was taken
                    break
                yield pb.PageBytes(data=data)
    finally:
        for task in (read, up):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if not ended:   # abort before the socket closes, so CRIU never reads the EOF as "done"
            await abort()
        writer.close()


class DestinationRelay:
    """The destination's end: listens on 127.0.0.1 for CRIU's lazy-pages daemon (one connection)
    and carries it to the source agent."""

    def __init__(self, transport: Transport, peer_host: str, peer_address: str, ckpt_id: str, ticket: bytes,
                 failure: Callable[[], str]):
        self.transport = transport
        self.peer_host, self.peer_address = peer_host, peer_address
        self.peer = f"agent {peer_host} at {peer_address}"
        self.ckpt_id, self.ticket = ckpt_id, ticket
        self.failure = failure   # why the daemon failed, from its log ('' when it did not)
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.connected = asyncio.Event()   # the daemon came: the restored process asked for memory
        self._server: asyncio.AbstractServer | None = None
        self._call = None
        self.bytes = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    def abort(self, why: str) -> None:
        """Break the stream without `end`: the source resumes (used before removing the container)."""
        if self._call is not None:
            self._call.cancel()
        if not self.done.done():
            self.done.set_exception(IntegrityError(why))
            self.done.exception()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._server is not None
        self._server.close()   # the daemon connects once
        self.connected.set()
        channel = self.transport.aio_channel(self.peer_address, agent_server_name(self.peer_host))
        self._call = call = pb_grpc.AgentStub(channel).RelayPages()
        try:
            await call.write(pb.PageBytes(checkpoint_id=self.ckpt_id, ticket=self.ticket))

            async def downstream() -> None:
                while (msg := await call.read()) is not grpc.aio.EOF:
                    self.bytes += len(msg.data)
                    writer.write(msg.data)
                    await writer.drain()

            down = asyncio.ensure_future(downstream())
            while data := await reader.read(CHUNK):
                await call.write(pb.PageBytes(data=data))
            # The daemon closed its connection: it either has every page or it failed.
            await asyncio.sleep(0.2)   # its last log lines
            why = self.failure()
            if why:
                raise IntegrityError(f"CRIU's lazy-pages daemon failed: {why}")
            await call.write(pb.PageBytes(end=True))
            await call.done_writing()
            await down
            if not self.done.done():
                self.done.set_result(self.bytes)
            log.info("post-copy memory received", checkpoint=self.ckpt_id, bytes=self.bytes)
        except (grpc.RpcError, OSError, IntegrityError, asyncio.CancelledError) as exc:
            err = from_rpc_error(exc, self.peer) if isinstance(exc, grpc.RpcError) else exc
            log.error("post-copy memory relay failed; the source resumes", checkpoint=self.ckpt_id, error=str(err))
            call.cancel()
            if not self.done.done():
                self.done.set_exception(IntegrityError(f"post-copy memory from {self.peer} stopped: {err}"))
                self.done.exception()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await channel.close()
