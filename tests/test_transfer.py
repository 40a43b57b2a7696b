"""The direct transfer's stream (agent/transfer.py), without gRPC: framing, order, the seal."""

from __future__ import annotations

import asyncio
import json
import os

import blake3
import pytest
import zstandard

from stasis.agent import bulk, transfer
from stasis.errors import IntegrityError
from stasis.security.tls import Transport

PAGE = 4096


def half_compressible(mib: int) -> bytes:
    return b"".join(os.urandom(PAGE) if i % 2 else bytes([i % 251]) * PAGE for i in range(mib * 256))


async def stream(tmp_path, data: bytes, compress: bool, grow: bool = False) -> list:
    """Every message send() yields for an archive of `data`; with `grow`, the archive is still being
    written (a piece at a time) while it is sent, as podman writes it."""
    spool = transfer.Spool(str(tmp_path / "spool"))
    path = spool.begin("c0ffee", b"offer", "web")

    async def write() -> None:
        with open(path, "wb") as f:
            for i in range(0, len(data), 300_000 if grow else len(data) or 1):
                f.write(data[i:i + 300_000] if grow else data)
                f.flush()
                await asyncio.sleep(0.005 if grow else 0)
        spool.finish("c0ffee", None)

    writer = asyncio.ensure_future(write())
    out = [m async for m in transfer.send(spool, None, "c0ffee", compress)]
    await writer
    return out


def received(messages) -> bytes:
    return b"".join(m.data if m.HasField("data") else transfer._unframe(m.zdata, "peer")
                    for m in messages if m.HasField("data") or m.HasField("zdata"))


@pytest.mark.parametrize("compress,grow", [(False, False), (True, False), (True, True)])
async def test_the_stream_carries_the_archive_in_order_and_seals_it(tmp_path, compress, grow):
    data = half_compressible(6) + os.urandom(12345)
    messages = await stream(tmp_path, data, compress, grow)
    assert messages[0].offer == b"offer" and messages[-1].HasField("seal")
    assert received(messages) == data
    seal = json.loads(messages[-1].seal)["seal"]
    assert seal["size"] == len(data) and seal["blake3"] == blake3.blake3(data).hexdigest()
    wire = sum(len(m.data) + len(m.zdata) for m in messages[1:-1])
    if compress:   # half the pages are one repeated byte: compressed, the stream is about half the size
        assert any(m.HasField("zdata") for m in messages) and wire < 0.6 * len(data)
        # The trailing random bytes gain nothing from zstd: read whole, they travel as they are.
        assert grow or messages[-2].HasField("data")
    else:
        assert wire == len(data) and not any(m.HasField("zdata") for m in messages)


@pytest.mark.parametrize("frame,problem", [
    (b"garbage", "malformed"),
    (zstandard.ZstdCompressor().compress(bytes(transfer.CHUNK + 1)), "within one chunk"),
    (zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100), "within one chunk"),
    (zstandard.ZstdCompressor().compress(b"x" * 1000)[:-3], "malformed"),
])
def test_hostile_frames_are_refused_in_one_line(frame, problem):
    with pytest.raises(IntegrityError, match=problem) as err:
        transfer._unframe(frame, "agent host-a at 127.0.0.1:1")
    assert "\n" not in str(err.value) and str(err.value).startswith("agent host-a")


@pytest.mark.parametrize("address,wanted", [("127.0.0.1:7001", False), ("[::1]:7001", False),
                                            ("localhost:7001", False), ("10.0.0.7:7001", True),
                                            ("[fd00::7]:7001", True), ("host-b.example:7001", True)])
def test_the_wire_is_compressed_across_a_network_only(address, wanted):
    assert transfer.wants_zstd(address) is wanted


async def bulk_stream(tmp_path, data: bytes, listener, dial: bool) -> tuple[list, bytes]:
    """send() with a bulk listener: the gRPC messages, and the bytes the bulk channel carried (the
    peer dials when `dial`, as Receiver does)."""
    spool = transfer.Spool(str(tmp_path / "spool"))
    path = spool.begin("c0ffee", b"offer", "web")
    with open(path, "wb") as f:
        f.write(data)
    spool.finish("c0ffee", None)
    messages, carried = [], bytearray()
    async for m in transfer.send(spool, None, "c0ffee", False, listener, "host-b"):
        messages.append(m)
        if m.HasField("bulk") and dial:
            sock = await asyncio.to_thread(bulk.dial, Transport.insecure(), "127.0.0.1", m.bulk.port, "", m.bulk.token)
            reader = asyncio.ensure_future(asyncio.to_thread(
                lambda s=sock: [carried.extend(p) for _, p in bulk.frames(s, "agent host-a")]))
    if dial:
        await reader
    return messages, bytes(carried)


async def test_the_bulk_channel_carries_the_bytes_and_the_stream_keeps_offer_and_seal(tmp_path):
    data = half_compressible(3) + os.urandom(777)
    listener = bulk.Listener(Transport.insecure(), "127.0.0.1:0")
    try:
        messages, carried = await bulk_stream(tmp_path, data, listener, dial=True)
    finally:
        listener.close()
    assert [m.WhichOneof("kind") for m in messages] == ["offer", "bulk", "seal"]
    assert carried == data
    seal = json.loads(messages[-1].seal)["seal"]
    assert seal["size"] == len(data) and seal["blake3"] == blake3.blake3(data).hexdigest()


async def test_a_peer_that_never_dials_gets_the_bytes_over_grpc(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "BULK_WAIT", 0.2)
    data = os.urandom(3 * transfer.CHUNK + 5)
    listener = bulk.Listener(Transport.insecure(), "127.0.0.1:0")
    try:
        messages, _ = await bulk_stream(tmp_path, data, listener, dial=False)
    finally:
        listener.close()
    assert [m.WhichOneof("kind") for m in messages] == ["offer", "bulk", "data", "data", "data", "data", "seal"]
    assert received(messages) == data
