"""Direct migration: checkpoints move from the source agent to the destination agent, mutually
authenticated, without the repository round trip.

The source writes the archive into its spool; the destination, holding a ticket the controller
signed, fetches it while it is still being written. The gRPC stream is: an offer (the checkpoint's
manifest, signed by the source like any manifest), the archive's bytes, and a seal the source signs
at the end over the archive's size, BLAKE3 hash and the image to load. The bytes may instead take
the bulk channel (bulk.py), announced in the stream; the seal covers them all the same. The
destination verifies the offer before it acts on it and the seal before a byte of the archive
reaches the runtime.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import AsyncIterator, Callable

import blake3
import grpc
import structlog
import zstandard

from stasis.agent import bulk, failpoints
from stasis.agent.spliced_archive import SplicedReader, logical_size
from stasis.agent.tar_split import PagesSplitter, SplitError, join_pages
from stasis.errors import IntegrityError, NotFound, StasisError, from_rpc_error
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.pki import agent_server_name
from stasis.security.provenance import Signer, Verifier
from stasis.security.tls import Transport, is_loopback
from stasis.storage.manifest import Manifest

log = structlog.get_logger("stasis.agent")
CHUNK = 1 << 20          # bytes per message: well under the 4 MiB message cap
AHEAD = 4                # chunks read (and compressed) ahead of the one on the wire
READ_AHEAD = 16          # messages the destination takes off the stream ahead of its disk
WIRE_LEVEL = 1           # zstd level on the wire: ~1 GB/s here, halves half-compressible memory
POLL = 0.01              # seconds between looks at an archive the dump is still writing
SPOOL_TTL = 3600.0       # seconds an unfetched archive is kept (a migration that never came)
BULK_WAIT = 10.0         # seconds the source waits for the fetcher on the bulk channel, then uses gRPC


class Spool:
    """Archives held for a peer: SPOOL/ID/{offer, container, checkpoint.tar[, checkpoint.tar.refs]}
    (refs: members whose data stay in their own files, spliced_archive).

    An entry exists from the moment the dump starts: podman writes the archive front to back, and
    a peer that is already fetching follows it as it grows (the transfer overlaps the dump). The
    entry's outcome (the image to ship, or the dump's error) is known to this process only.
    """

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self._outcomes: dict[str, asyncio.Future] = {}
        # Ended entries (fetched, or their dump failed), so a late fetch is answered at once.
        self._ended: collections.OrderedDict[str, StasisError] = collections.OrderedDict()

    def end(self, ckpt_id: str, why: StasisError) -> None:
        self._ended[ckpt_id] = why
        while len(self._ended) > 256:
            self._ended.popitem(last=False)

    def _dir(self, ckpt_id: str) -> str:
        if not ckpt_id.isalnum():
            raise NotFound(f"no checkpoint {ckpt_id!r} held for a direct migration")
        return os.path.join(self.folder, ckpt_id)

    def begin(self, ckpt_id: str, offer: bytes, container: str) -> str:
        """Open an entry before the dump; returns where the runtime must write the archive."""
        self.expire()
        folder = self._dir(ckpt_id)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        with open(os.path.join(folder, "container"), "w") as f:
            f.write(container)
        with open(os.path.join(folder, "offer"), "wb") as f:
            f.write(offer)
        self._outcomes[ckpt_id] = asyncio.get_running_loop().create_future()
        return os.path.join(folder, "checkpoint.tar")

    def finish(self, ckpt_id: str, image: dict | None) -> None:
        """The dump is complete; `image` (an artifact's JSON) goes into the seal."""
        outcome = self._outcomes.get(ckpt_id)
        if outcome is not None and not outcome.done():
            outcome.set_result(image)

    def fail(self, ckpt_id: str, error: StasisError) -> None:
        outcome = self._outcomes.pop(ckpt_id, None)
        if outcome is not None and not outcome.done():
            outcome.set_exception(error)
            outcome.exception()   # retrieved here: nobody may be fetching
        self.drop(ckpt_id)
        self.end(ckpt_id, error)

    async def open(self, ckpt_id: str, wait: float = 30.0) -> tuple[str, bytes, asyncio.Future]:
        """An entry's archive path, offer and outcome; waits a little for a dump about to begin."""
        deadline = time.monotonic() + wait
        while ckpt_id not in self._outcomes:
            if ckpt_id in self._ended:
                raise self._ended[ckpt_id]
            if time.monotonic() > deadline:
                raise NotFound(f"no checkpoint {ckpt_id} held for a direct migration on this host "
                               f"(fetched already, failed, or expired)")
            await asyncio.sleep(0.02)
        with open(os.path.join(self._dir(ckpt_id), "offer"), "rb") as f:
            offer = f.read()
        return os.path.join(self._dir(ckpt_id), "checkpoint.tar"), offer, self._outcomes[ckpt_id]

    def size(self, ckpt_id: str) -> int:
        return logical_size(os.path.join(self._dir(ckpt_id), "checkpoint.tar"))

    def drop(self, ckpt_id: str) -> None:
        self._outcomes.pop(ckpt_id, None)
        shutil.rmtree(self._dir(ckpt_id), ignore_errors=True)

    def drop_container(self, container: str) -> None:
        """A rolled-back or removed container's held archives are of no more use."""
        for name in os.listdir(self.folder):
            try:
                with open(os.path.join(self.folder, name, "container")) as f:
                    if f.read() == container:
                        self.drop(name)
            except OSError:
                continue

    def expire(self, ttl: float = SPOOL_TTL) -> None:
        now = time.time()
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if now - os.path.getmtime(path) > ttl:
                self.drop(name)


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


async def send(spool: Spool, signer: Signer | None, ckpt_id: str, compress: bool = False,
               listener: bulk.Listener | None = None, peer: str = "") -> AsyncIterator[pb.TransferChunk]:
    """The source's side of the stream, from the first byte the dump writes; the spool entry goes
    once the whole archive is out. With a `listener` (the fetcher asked for it), the bytes go over
    the bulk channel to agent `peer`, or over this stream if it does not connect in time. With
    `compress` (the fetcher reads zdata), chunks travel as zstd frames."""
    archive, offer, outcome = await spool.open(ckpt_id)
    yield pb.TransferChunk(offer=offer)
    while not os.path.exists(archive):   # the runtime has not created it yet
        if outcome.done():
            outcome.result()   # raises the dump's error
            break
        await asyncio.sleep(POLL)
    sock = None
    if listener is not None:
        token = secrets.token_bytes(bulk.TOKEN)
        waiting = listener.expect(token, peer)
        yield pb.TransferChunk(bulk=pb.BulkOffer(port=listener.port, token=token))
        sock = await bulk.accepted(listener, token, waiting, BULK_WAIT)
        if sock is None and waiting.cancelled():   # timed out (a peer that declined was logged by the listener)
            log.warning("the peer did not connect to the bulk channel; sending over gRPC (slower): "
                        "let agents reach each other's --bulk-listen port", checkpoint=ckpt_id, peer=peer,
                        port=listener.port)
    digest = blake3.blake3()   # one thread: its helpers would only take cores from CRIU and the stream
    ended = threading.Event()   # the dump's end, for threads
    outcome.add_done_callback(lambda _f: ended.set())
    started = time.monotonic()
    stats = {"size": 0, "wire": 0, "messages": 0, "dump_ended": 0.0,
             "corrupt": "transfer.corrupt_byte" in failpoints.armed()}   # tests: damage in transit
    f = SplicedReader(archive)
    try:
        if sock is not None:
            await _in_thread(_pump, sock, f, digest, ended, compress, stats)
        else:
            async for msg in _messages(f, digest, outcome, compress, stats):
                yield msg
    finally:
        bulk.shut(sock)
        f.close()
    finished, size, dump_ended = time.monotonic(), stats["size"], stats["dump_ended"]
    image = outcome.result()   # raises the dump's error: the peer must not restore a partial archive
    if size != spool.size(ckpt_id):
        raise IntegrityError(f"checkpoint {ckpt_id} changed while it was sent ({size} bytes sent, "
                             f"{spool.size(ckpt_id)} on disk)")
    seal = {"checkpoint": ckpt_id, "size": size, "blake3": digest.hexdigest(),
            "offer_sha256": hashlib.sha256(offer).hexdigest(), "image": image}
    body = _canonical(seal)
    yield pb.TransferChunk(seal=_canonical({"seal": seal, "signature": signer.sign_bytes(body) if signer else None}))
    spool.drop(ckpt_id)
    spool.end(ckpt_id, NotFound(f"checkpoint {ckpt_id} was fetched already; a migration fetches once"))
    log.info("checkpoint sent to peer", checkpoint=ckpt_id, channel="bulk" if sock else "grpc", bytes=size,
             wire_bytes=stats["wire"], messages=stats["messages"], seconds=round(finished - started, 3),
             after_dump=round(finished - (dump_ended or finished), 3))


async def _in_thread(fn, sock, *args):
    """Run a blocking pump on `sock` in a thread; if this task is cancelled (the peer went away), the
    socket is shut so that the thread returns, and waited for."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, sock, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        bulk.shut(sock)
        await asyncio.gather(work, return_exceptions=True)
        raise


def _counted(data: bytes, stats: dict) -> bytes:
    """A chunk read for sending, counted; the corrupt-byte failpoint damages the second one."""
    stats["size"] += len(data)
    if stats["corrupt"] and stats["size"] > len(data):
        data, stats["corrupt"] = bytes([data[0] ^ 0xFF]) + data[1:], False
    return data


def _pump(sock, f: SplicedReader, digest, ended: threading.Event, compress: bool, stats: dict) -> None:
    """Bulk channel, source: read, hash and send the archive as it grows, then END. One thread does
    it all; the peer's thread writes while this one reads, and the TLS work releases the GIL."""
    quiet = time.monotonic()
    while True:
        # Read before asking whether the dump is done: what was written before it ended is read.
        finished = ended.is_set()
        if finished and not stats["dump_ended"]:
            stats["dump_ended"] = time.monotonic()
        data = _read_hashed(f, digest)
        if not data:
            if finished:
                break
            if time.monotonic() - quiet > bulk.KEEPALIVE_EVERY:
                bulk.send_frame(sock, bulk.KEEPALIVE)
                quiet = time.monotonic()
            time.sleep(POLL)
            continue
        data = _counted(data, stats)
        kind, payload = (bulk.DATA, data)
        if compress:
            msg = _frame(data)
            kind, payload = (bulk.ZSTD, msg.zdata) if msg.HasField("zdata") else (bulk.DATA, data)
        bulk.send_frame(sock, kind, payload)
        stats["wire"], stats["messages"] = stats["wire"] + len(payload), stats["messages"] + 1
        quiet = time.monotonic()
    bulk.send_frame(sock, bulk.END)


async def _messages(f: SplicedReader, digest, outcome: asyncio.Future, compress: bool,
                    stats: dict) -> AsyncIterator[pb.TransferChunk]:
    """gRPC, source: a task reads and hashes a few chunks ahead of the one on the wire (measured:
    reading, hashing and sending one after the other held a GiB to ~400 MB/s here); compressed
    chunks are made in worker threads."""
    ahead: asyncio.Queue = asyncio.Queue(maxsize=AHEAD)

    async def produce() -> None:
        try:
            while True:
                finished = outcome.done()
                if finished and not stats["dump_ended"]:
                    stats["dump_ended"] = time.monotonic()
                # One read at a time, in a worker, so the hash sees the bytes in order.
                data = await asyncio.to_thread(_read_hashed, f, digest)
                if not data:
                    if finished:
                        break
                    await asyncio.sleep(POLL)
                    continue
                data = _counted(data, stats)
                if compress:
                    await ahead.put(asyncio.ensure_future(asyncio.to_thread(_frame, data)))
                else:
                    await ahead.put(pb.TransferChunk(data=data))
            await ahead.put(None)
        except BaseException as exc:   # handed to the stream, which raises it
            await ahead.put(exc)

    producer = asyncio.ensure_future(produce())
    try:
        while (item := await ahead.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            msg = await item if isinstance(item, asyncio.Future) else item
            stats["wire"], stats["messages"] = stats["wire"] + len(msg.data) + len(msg.zdata), stats["messages"] + 1
            yield msg
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        while not ahead.empty():   # frames still compressing when the stream ended early
            item = ahead.get_nowait()
            if isinstance(item, asyncio.Future):
                await asyncio.gather(item, return_exceptions=True)


def wants_zstd(peer_address: str) -> bool:
    """Compress on the wire only across a network: zstd (~1 GB/s a core) beats any link up to 10 GbE,
    but on loopback (one machine, its cores shared by both agents) it only costs CPU. Measured here on
    2 cores, 1 GiB: the sender fell 3.5 s behind podman's export with it, 0.5 s without."""
    return not is_loopback(peer_address)


def _read_hashed(f: SplicedReader, digest) -> bytes:
    data = f.read(CHUNK)
    digest.update(data)
    return data


def _hash_write(write: Callable[[bytes], object], data: bytes, digest) -> None:
    digest.update(data)
    write(data)


def _frame(data: bytes) -> pb.TransferChunk:
    """A chunk compressed for the wire: a zstd frame when that is smaller (pages of random data are not)."""
    packed = zstandard.ZstdCompressor(level=WIRE_LEVEL).compress(data)
    return pb.TransferChunk(zdata=packed) if len(packed) < len(data) else pb.TransferChunk(data=data)


def _unframe(packed: bytes | bytearray, peer: str) -> bytes:
    """A zdata frame's bytes; the source is authenticated, but its frames are still bounded before use."""
    try:
        if zstandard.frame_content_size(packed) not in range(1, CHUNK + 1):
            raise zstandard.ZstdError("the frame does not declare a size within one chunk")
        return zstandard.ZstdDecompressor().decompress(packed, max_output_size=CHUNK)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"{peer} sent a malformed compressed chunk ({e}); refusing it") from None


class Receiver:
    """The destination's side: `offer()` verifies and returns the manifest; `archive()` writes the
    bytes to `path` and checks the seal."""

    def __init__(self, transport: Transport, verifier: Verifier | None, peer_host: str, peer_address: str,
                 ckpt_id: str, ticket: bytes, post_copy: bool = False, page_ticket: bytes = b""):
        self.transport = transport
        self.peer_address = peer_address
        self.post_copy, self.page_ticket = post_copy, page_ticket   # memory follows the restore
        self.verifier = verifier
        self.peer_host = peer_host
        self.peer = f"agent {peer_host} at {peer_address}"
        channel = transport.aio_channel(peer_address, agent_server_name(peer_host))
        self.channel = channel
        self.call = pb_grpc.AgentStub(channel).FetchCheckpoint(
            pb.FetchCheckpointRequest(checkpoint_id=ckpt_id, ticket=ticket, zstd=wants_zstd(peer_address),
                                      bulk=True),
            timeout=3600)
        self.channel_used = "grpc"
        self.ckpt_id, self.ticket = ckpt_id, ticket
        self._dial_error = ""
        self.raw_offer = b""
        self.manifest: Manifest | None = None

    async def _next(self) -> pb.TransferChunk | None:
        try:
            return await self.call.read()
        except grpc.RpcError as err:
            raise from_rpc_error(err, self.peer) from None

    async def offer(self) -> Manifest:
        first = await self._next()
        if first is grpc.aio.EOF or first is None or not first.HasField("offer"):
            raise IntegrityError(f"{self.peer} did not start the transfer with an offer")
        manifest = Manifest.from_bytes(first.offer, f"offer of checkpoint {self.ckpt_id} from {self.peer}")
        if manifest.id != self.ckpt_id or manifest.host != self.peer_host:
            raise IntegrityError(f"{self.peer} offered checkpoint {manifest.id} of {manifest.host}, "
                                 f"not {self.ckpt_id} of {self.peer_host}")
        if self.verifier is not None:
            self.verifier.verify(manifest)
        self.raw_offer, self.manifest = first.offer, manifest
        return manifest

    async def archive(self, path: str, emit: Callable[[int], None], pages_dir: str = "", pool: str = "") -> dict:
        """Write the archive to `path`; returns the verified seal (size, image to ship). With
        `pages_dir`, CRIU's pages-*.img go there instead (tar_split); without, any sent in parts are
        joined into the archive, whole, once the seal is verified. The seal covers the stream as it was sent."""
        digest = blake3.blake3()   # one thread, as the sender's
        size = 0
        seal = None
        offered = False   # the bulk channel, at most once and before any byte
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        joined = "" if pages_dir else tempfile.mkdtemp(prefix="pages-", dir=os.path.dirname(path) or ".")
        splitter = PagesSplitter(fd, pages_dir or joined, whole=bool(pages_dir), pool=pool if pages_dir else "")
        write = splitter.feed
        # The stream is read ahead of the disk by a task of its own, so that the network and the
        # disk work at the same time (HTTP/2's flow control never waits on a write).
        ahead: asyncio.Queue = asyncio.Queue(maxsize=READ_AHEAD)

        async def pull() -> None:
            try:
                while True:
                    item = await self._next()
                    await ahead.put(item)
                    if item is grpc.aio.EOF or item is None:
                        return
            except BaseException as exc:   # handed to the consumer, which raises it
                await ahead.put(exc)

        puller = asyncio.ensure_future(pull())
        try:
            while True:
                item = await ahead.get()
                if isinstance(item, BaseException):
                    raise item
                if item is grpc.aio.EOF or item is None:
                    break
                if item.HasField("seal"):
                    seal = item.seal
                    continue
                if item.HasField("bulk"):
                    if seal is not None or size or offered:
                        raise IntegrityError(f"{self.peer} offered the bulk channel mid-transfer")
                    offered = True
                    sock = await asyncio.to_thread(self._dial, item.bulk)
                    if sock is None:
                        await self._decline(item.bulk.token)
                    taken = None if sock is None else await _in_thread(self._take, sock, write, digest, emit)
                    if taken is not None:
                        size, self.channel_used = taken, "bulk"
                    continue
                if seal is not None or not (item.HasField("data") or item.HasField("zdata")):
                    raise IntegrityError(f"{self.peer} sent data after the seal")
                if self.channel_used == "bulk":
                    raise IntegrityError(f"{self.peer} sent data on both channels")
                data = item.data if item.HasField("data") else await asyncio.to_thread(_unframe, item.zdata,
                                                                                       self.peer)
                size += len(data)
                await asyncio.to_thread(_hash_write, write, data, digest)   # in order: one write at a time
                emit(size)
            names = splitter.close()
            if seal is None:
                raise IntegrityError(f"the transfer from {self.peer} ended without a seal: incomplete")
            checked = self._check_seal(seal, size, digest.hexdigest())
            if names and joined:
                await asyncio.to_thread(join_pages, fd, splitter.end_at, joined, names)
            return checked
        except SplitError as e:
            raise IntegrityError(f"the archive from {self.peer} is malformed ({e}); refusing it") from None
        finally:
            puller.cancel()
            await asyncio.gather(puller, return_exceptions=True)
            os.close(fd)
            if joined:
                await asyncio.to_thread(shutil.rmtree, joined, True)
            await self.channel.close()

    def _dial(self, offer: pb.BulkOffer):
        """The bulk channel's socket, or None when it cannot be set up (the source then uses gRPC)."""
        try:
            return bulk.dial(self.transport, bulk.host_of(self.peer_address), offer.port,
                             agent_server_name(self.peer_host), offer.token)
        except bulk.Unavailable as e:
            log.warning("bulk channel unavailable; receiving over gRPC (slower)", peer=self.peer, error=str(e))
            self._dial_error = str(e)
            return None

    async def _decline(self, token: bytes) -> None:
        """Tell the source at once, so that it sends on the stream without waiting out BULK_WAIT. Best
        effort: a source without DeclineBulk (older) or unreachable still falls back on its own."""
        request = pb.DeclineBulkRequest(checkpoint_id=self.ckpt_id, ticket=self.ticket, token=token,
                                        reason=self._dial_error)
        try:
            await pb_grpc.AgentStub(self.channel).DeclineBulk(request, timeout=10)
        except grpc.RpcError as err:
            log.warning("could not decline the bulk channel; the source falls back on its own",
                        peer=self.peer, error=from_rpc_error(err, self.peer).message)

    def _take(self, sock, write: Callable[[bytes], object], digest, emit: Callable[[int], None]) -> int | None:
        """Bulk channel, destination: hash and write each frame as it comes; returns the bytes taken,
        or None when the source closed the channel before its first frame (it then uses gRPC)."""
        size = 0
        try:
            for kind, payload in bulk.frames(sock, self.peer):
                data = _unframe(payload, self.peer) if kind == bulk.ZSTD else payload
                size += len(data)
                _hash_write(write, data, digest)
                emit(size)
        except bulk.Unavailable as e:
            log.warning("bulk channel unavailable; receiving over gRPC (slower)", peer=self.peer, error=str(e))
            return None
        finally:
            bulk.shut(sock)
        return size

    def _check_seal(self, raw: bytes, size: int, blake: str) -> dict:
        assert self.manifest is not None
        where = f"transfer of checkpoint {self.ckpt_id} from {self.peer}"
        try:
            doc = json.loads(raw)
            seal, sig = doc["seal"], doc.get("signature")
            if not isinstance(seal, dict) or not (sig is None or isinstance(sig, dict)):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{where}: the seal is malformed") from None
        if self.verifier is not None:
            self.verifier.verify_document(_canonical(seal), sig, self.peer_host, self.manifest.created, where)
        expected = {"checkpoint": self.ckpt_id, "size": size, "blake3": blake,
                    "offer_sha256": hashlib.sha256(self.raw_offer).hexdigest()}
        for key, value in expected.items():
            if seal.get(key) != value:
                raise IntegrityError(f"{where}: {key} differs from what the source sealed "
                                     f"(damaged in transit); refusing to restore")
        return seal
