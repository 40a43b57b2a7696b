"""Cutting artifacts into chunks. Parameters live in the repository config and never change, so
the same bytes give the same chunks in every checkpoint (that is what makes dedup work).

The default, "tar-pages", cuts a tar archive (podman's checkpoint archive, an image archive) at
every member's header and data start, and each member's data into 4 KiB pieces aligned to its
start: CRIU's page images keep their pages aligned to chunks however the members before them
shift. bench/chunking.py measured why: with a container rewriting 5 % of its pages, 4 KiB chunks
store 9.5 % new bytes per checkpoint, 64 KiB chunks 57 %, FastCDC (64 KiB-1 MiB) 69-100 %.
"fastcdc" remains available for data that shifts (pyfastcdc, native core).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

from pyfastcdc import FastCDC

from stasis.errors import IntegrityError

DEFAULT = {"algorithm": "tar-pages", "size": 4096}


@dataclass(frozen=True)
class ChunkerParams:
    algorithm: str
    size: int = 4096          # tar-pages: piece size; fastcdc: average size
    min: int = 0              # fastcdc only
    max: int = 0              # fastcdc only

    @classmethod
    def from_json(cls, data) -> "ChunkerParams":
        try:
            p = cls(str(data["algorithm"]), int(data["size"]), int(data.get("min", 0)), int(data.get("max", 0)))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError("repository config: chunker parameters are malformed") from None
        ok = (p.algorithm == "tar-pages" and 512 <= p.size <= 1 << 20) or (
            p.algorithm == "fastcdc" and 64 <= p.min <= p.size <= p.max <= 16 << 20)
        if not ok:
            raise IntegrityError(f"repository config: unsupported chunker {p}")
        return p

    def to_json(self) -> dict:
        if self.algorithm == "fastcdc":
            return {"algorithm": "fastcdc", "size": self.size, "min": self.min, "max": self.max}
        return {"algorithm": self.algorithm, "size": self.size}


def pieces(path: str, params: ChunkerParams) -> Iterator[tuple[int, int]]:
    """(start, end) of every chunk of the file, in order. The bytes are read by whoever hashes
    them: planning a tar's cuts needs only its headers."""
    if params.algorithm == "fastcdc":
        cdc = FastCDC(params.size, min_size=params.min, max_size=params.max)
        for chunk in cdc.cut_file(path):   # mmap-backed: nothing is copied here
            yield chunk.offset, chunk.offset + chunk.length
        return
    yield from _pieces(os.path.getsize(path), tar_boundaries(path), params.size)


def cut_file(path: str, params: ChunkerParams) -> Iterator[bytes]:
    """The file's chunks as bytes, in order (for tests and tools; the repository reads by pieces)."""
    with open(path, "rb") as f:
        for start, end in pieces(path, params):
            f.seek(start)
            yield f.read(end - start)


def tar_boundaries(path: str) -> list[int]:
    """Offsets of every member's header and data start and data end; [] if `path` is no tar."""
    cuts = []
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                cuts += [member.offset, member.offset_data, member.offset_data + member.size]
    except (tarfile.TarError, OSError, ValueError):
        return []
    return cuts


def _pieces(total: int, boundaries: list[int], size: int) -> Iterator[tuple[int, int]]:
    pos = 0
    for nxt in sorted({b for b in boundaries if 0 < b < total} | {total}):
        while nxt - pos > size:   # from each boundary on, pieces of `size`: aligned to it
            yield pos, pos + size
            pos += size
        if nxt > pos:
            yield pos, nxt
            pos = nxt
