"""Direct migration: checkpoints move from the source agent to the destination agent over one
mutually authenticated gRPC stream, without the repository round trip.

The source keeps the dumped archive in its spool; the destination fetches it with a ticket the
controller signed. The stream is: an offer (the checkpoint's manifest, signed by the source like
any manifest), the archive's bytes, and a seal the source signs over the archive's size and BLAKE3
hash. The destination verifies the offer before it acts on it and the seal before a byte of the
archive reaches the runtime.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import time
from typing import AsyncIterator, Callable

import blake3
import grpc
import structlog

from stasis.agent import failpoints
from stasis.errors import IntegrityError, NotFound, from_rpc_error
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.proto.v1 import stasis_pb2_grpc as pb_grpc
from stasis.security.pki import agent_server_name
from stasis.security.provenance import Signer, Verifier
from stasis.security.tls import Transport
from stasis.storage.manifest import Manifest

log = structlog.get_logger("stasis.agent")
CHUNK = 1 << 20          # bytes per message: well under the 4 MiB message cap
SPOOL_TTL = 3600.0       # seconds an unfetched archive is kept (a migration that never came)


class Spool:
    """Archives held for a peer: SPOOL/ID/checkpoint.tar and SPOOL/ID/offer (the signed manifest)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)

    def _dir(self, ckpt_id: str) -> str:
        if not ckpt_id.isalnum():
            raise NotFound(f"no checkpoint {ckpt_id!r} held for a direct migration")
        return os.path.join(self.folder, ckpt_id)

    def put(self, ckpt_id: str, archive: str, offer: bytes, container: str) -> None:
        self.expire()
        folder = self._dir(ckpt_id)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.replace(archive, os.path.join(folder, "checkpoint.tar"))
        with open(os.path.join(folder, "container"), "w") as f:
            f.write(container)
        with open(os.path.join(folder, "offer"), "wb") as f:   # last: its presence means complete
            f.write(offer)

    def get(self, ckpt_id: str) -> tuple[str, bytes]:
        folder = self._dir(ckpt_id)
        try:
            with open(os.path.join(folder, "offer"), "rb") as f:
                offer = f.read()
        except FileNotFoundError:
            raise NotFound(f"no checkpoint {ckpt_id} held for a direct migration on this host "
                           f"(fetched already, or expired)") from None
        return os.path.join(folder, "checkpoint.tar"), offer

    def size(self, ckpt_id: str) -> int:
        return os.path.getsize(os.path.join(self._dir(ckpt_id), "checkpoint.tar"))

    def drop(self, ckpt_id: str) -> None:
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
                shutil.rmtree(path, ignore_errors=True)


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


async def send(spool: Spool, signer: Signer | None, ckpt_id: str) -> AsyncIterator[pb.TransferChunk]:
    """The source's side of the stream; the spool entry goes once the whole archive is out."""
    archive, offer = spool.get(ckpt_id)
    yield pb.TransferChunk(offer=offer)
    digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
    size = 0
    corrupt = "transfer.corrupt_byte" in failpoints.armed()   # tests: damage in transit
    with open(archive, "rb") as f:
        while True:
            data = await asyncio.to_thread(f.read, CHUNK)
            if not data:
                break
            digest.update(data)
            size += len(data)
            if corrupt and size > len(data):
                data, corrupt = bytes([data[0] ^ 0xFF]) + data[1:], False
            yield pb.TransferChunk(data=data)
    seal = {"checkpoint": ckpt_id, "size": size, "blake3": digest.hexdigest(),
            "offer_sha256": hashlib.sha256(offer).hexdigest()}
    body = _canonical(seal)
    yield pb.TransferChunk(seal=_canonical({"seal": seal, "signature": signer.sign_bytes(body) if signer else None}))
    spool.drop(ckpt_id)
    log.info("checkpoint sent to peer", checkpoint=ckpt_id, bytes=size)


class Receiver:
    """The destination's side: `offer()` verifies and returns the manifest; `archive()` writes the
    bytes to `path` and checks the seal."""

    def __init__(self, transport: Transport, verifier: Verifier | None, peer_host: str, peer_address: str,
                 ckpt_id: str, ticket: bytes):
        self.transport = transport
        self.verifier = verifier
        self.peer_host = peer_host
        self.peer = f"agent {peer_host} at {peer_address}"
        channel = transport.aio_channel(peer_address, agent_server_name(peer_host))
        self.channel = channel
        self.call = pb_grpc.AgentStub(channel).FetchCheckpoint(
            pb.FetchCheckpointRequest(checkpoint_id=ckpt_id, ticket=ticket), timeout=3600)
        self.ckpt_id = ckpt_id
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

    async def archive(self, path: str, emit: Callable[[int], None]) -> int:
        digest = blake3.blake3(max_threads=blake3.blake3.AUTO)
        size = 0
        seal = None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                item = await self._next()
                if item is grpc.aio.EOF or item is None:
                    break
                if item.HasField("seal"):
                    seal = item.seal
                    continue
                if seal is not None or not item.HasField("data"):
                    raise IntegrityError(f"{self.peer} sent data after the seal")
                digest.update(item.data)
                size += len(item.data)
                await asyncio.to_thread(os.write, fd, item.data)
                emit(size)
        finally:
            os.close(fd)
            await self.channel.close()
        if seal is None:
            raise IntegrityError(f"the transfer from {self.peer} ended without a seal: incomplete")
        self._check_seal(seal, size, digest.hexdigest())
        return size

    def _check_seal(self, raw: bytes, size: int, blake: str) -> None:
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
