"""Blobs, packs and index files (docs/repository-format.md).

A blob is a group of up to GROUP_CHUNKS consecutive new chunks, compressed together and sealed
once: per-chunk cost stays at one keyed hash, which matters with 4 KiB chunks (262 144 per GiB).
Each chunk stays individually addressable (blob + offset in its plaintext) and is re-hashed on read.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Iterator

import zstandard

from stasis.errors import IntegrityError
from stasis.storage.crypto import Sealer, content_hash

RAW, ZSTD = 0, 1
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ID = 32                      # bytes of a chunk id
GROUP_CHUNKS = 64
GROUP_BYTES = 256 << 10
MAX_BLOB_PLAIN = 16 << 20    # a blob claiming more is hostile


def encode_blob(sealer: Sealer, plain: bytes, level: int = 3) -> bytes:
    """Compress (unless it does not pay) and seal a group of chunks."""
    body = None
    # Encrypted or random memory does not compress, and trying costs ~1 s per GiB: a 4 KiB sample
    # at the fastest level decides (consecutive pages tend to be alike).
    sample = plain[:4096]
    if len(zstandard.ZstdCompressor(level=1).compress(sample)) < len(sample) - len(sample) // 32:
        compressed = zstandard.ZstdCompressor(level=level).compress(plain)
        if len(compressed) < len(plain) - len(plain) // 32:
            body = bytes([ZSTD]) + compressed
    return sealer.seal(body or bytes([RAW]) + plain, b"blob")


def decode_blob(sealer: Sealer, blob: bytes, plain_length: int, what: str) -> bytes:
    body = sealer.open(blob, b"blob", what)
    if not body or body[0] not in (RAW, ZSTD) or plain_length > MAX_BLOB_PLAIN:
        raise IntegrityError(f"{what} is malformed")
    if body[0] == ZSTD:
        try:
            plain = zstandard.ZstdDecompressor().decompress(body[1:], max_output_size=plain_length)
        except zstandard.ZstdError:
            raise IntegrityError(f"{what} does not decompress: it is damaged") from None
    else:
        plain = body[1:]
    if len(plain) != plain_length:
        raise IntegrityError(f"{what} has the wrong length: it is damaged")
    return plain


@dataclass(frozen=True, slots=True)
class Location:
    """Where a chunk lives: a blob of a pack, and the chunk's place in the blob's plaintext."""

    pack: str
    blob_offset: int
    blob_length: int
    blob_plain: int
    offset: int
    length: int


@dataclass
class PackBuilder:
    blobs: list[list[int]] = field(default_factory=list)      # [offset, length, plain length]
    ids: bytearray = field(default_factory=bytearray)
    chunks: list[list[int]] = field(default_factory=list)     # [blob index, offset in plain, length]
    parts: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, blob: bytes, plain_length: int, members: list[tuple[bytes, int, int]]) -> None:
        index = len(self.blobs)
        self.blobs.append([self.size, len(blob), plain_length])
        for chunk_id, offset, length in members:
            self.ids += chunk_id
            self.chunks.append([index, offset, length])
        self.parts.append(blob)
        self.size += len(blob)

    def table(self, size: int) -> dict:
        return {"size": size, "blobs": self.blobs, "ids": bytes(self.ids), "chunks": self.chunks}

    def finish(self, sealer: Sealer) -> tuple[str, bytes, dict]:
        """The pack's bytes: blobs, then a sealed trailer describing them (an index can be rebuilt)."""
        table = {**self.table(self.size), "ids": _b64(self.ids)}
        trailer = sealer.seal(zstandard.ZstdCompressor().compress(json.dumps(table).encode()), b"pack")
        data = b"".join([*self.parts, trailer, struct.pack(">I", len(trailer))])   # one copy, not two
        return content_hash(data), data, self.table(len(data))


def pack_key(pack_id: str) -> str:
    return f"packs/{pack_id[:2]}/{pack_id}"


def table_chunks(table: dict) -> Iterator[tuple[bytes, int, int, int]]:
    """(chunk id, blob index, offset in blob plaintext, length) of every chunk a pack table lists."""
    ids = table["ids"]
    for i, (blob, offset, length) in enumerate(table["chunks"]):
        yield ids[i * ID:(i + 1) * ID], blob, offset, length


def locations(pack_id: str, table: dict) -> Iterator[tuple[bytes, Location]]:
    blobs = table["blobs"]
    for chunk_id, blob, offset, length in table_chunks(table):
        b = blobs[blob]
        yield chunk_id, Location(pack_id, b[0], b[1], b[2], offset, length)


def check_table(table, what: str, limit: int | None = None) -> dict:
    """Validate a pack table read back from storage; ids come back decoded to bytes."""
    def ints(row, n):
        return isinstance(row, list) and len(row) == n and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row)
    try:
        size, blobs, chunks = table["size"], table["blobs"], table["chunks"]
        ids = base64.b64decode(table["ids"], validate=True)
        ok = isinstance(size, int) and isinstance(blobs, list) and isinstance(chunks, list)
        ok = ok and len(ids) == ID * len(chunks)
        ok = ok and all(ints(b, 3) and b[0] + b[1] <= (limit or size) and b[2] <= MAX_BLOB_PLAIN for b in blobs)
        ok = ok and all(ints(c, 3) and c[0] < len(blobs) and c[1] + c[2] <= blobs[c[0]][2] for c in chunks)
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise IntegrityError(f"{what} is malformed")
    return {"size": size, "blobs": blobs, "ids": ids, "chunks": chunks}


def read_trailer(sealer: Sealer, data: bytes, what: str) -> dict:
    if len(data) < 4:
        raise IntegrityError(f"{what} is truncated")
    (n,) = struct.unpack(">I", data[-4:])
    if n > len(data) - 4:
        raise IntegrityError(f"{what} has a malformed trailer")
    try:
        raw = zstandard.ZstdDecompressor().decompress(sealer.open(data[-4 - n:-4], b"pack", f"{what} trailer"),
                                                      max_output_size=256 << 20)
        return check_table(json.loads(raw), f"{what} trailer", len(data) - 4 - n)
    except (ValueError, zstandard.ZstdError):
        raise IntegrityError(f"{what} has a malformed trailer") from None


def encode_index(sealer: Sealer, packs: dict[str, dict]) -> tuple[str, bytes]:
    plain = json.dumps({"packs": {p: {**t, "ids": _b64(t["ids"])} for p, t in packs.items()}},
                       separators=(",", ":")).encode()
    data = sealer.seal(zstandard.ZstdCompressor().compress(plain), b"index")
    return content_hash(data), data


def _b64(ids) -> str:
    return ids if isinstance(ids, str) else base64.b64encode(bytes(ids)).decode()


def decode_index(sealer: Sealer, data: bytes, index_id: str) -> dict[str, dict]:
    what = f"index {index_id[:12]}"
    if content_hash(data) != index_id:
        raise IntegrityError(f"{what} does not match its name: it is damaged")
    try:
        raw = zstandard.ZstdDecompressor().decompress(sealer.open(data, b"index", what), max_output_size=1 << 30)
        packs = json.loads(raw)["packs"]
        assert isinstance(packs, dict)
    except (ValueError, KeyError, TypeError, AssertionError, zstandard.ZstdError):
        raise IntegrityError(f"{what} is malformed") from None
    out = {}
    for pack_id, table in packs.items():
        if not HEX64.match(pack_id):
            raise IntegrityError(f"{what} names a malformed pack")
        out[pack_id] = check_table(table, f"{what} pack {pack_id[:12]}")
    return out
