"""A stored artifact read in place: a seekable, read-only file over the repository.

A read fetches only the blobs that hold the chunks it covers (neighbouring blobs of a pack in one
ranged GET, as Repository.fetch_file plans them), authenticates each blob and re-hashes each chunk
before a byte of it is returned. Forensics uses it to answer a question about a checkpoint from the
few objects that question needs: a tar header here, a core image there, the pages of one mapping.

Decoded blobs are kept in a small LRU cache, so reading a tar header by header, or memory a block at
a time, fetches each blob once.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import io
import threading
from array import array

from stasis.errors import IntegrityError
from stasis.storage.manifest import ID_BYTES, Artifact
from stasis.storage.pack import decode_blob

CACHE_BYTES = 32 << 20


class Window:
    """A read-only, seekable file over [start, start+size) of anything read by position (`pread`)."""

    def __init__(self, pread, start: int, size: int, name: str = ""):
        self._pread, self._start, self.size, self.name, self._pos = pread, start, size, name, 0

    def read(self, n: int = -1) -> bytes:
        left = self.size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        data = self._pread(self._start + self._pos, n) if n > 0 else b""
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ArtifactFile(Window):
    def __init__(self, repo, artifact: Artifact, what: str = "checkpoint"):
        super().__init__(self.pread, 0, artifact.size, what)
        self.repo, self.artifact, self.what = repo, artifact, what
        self.fetched = 0          # bytes loaded from the backend: what a question cost
        self._offsets = array("q", [0])
        for _, size in artifact.chunks():
            self._offsets.append(self._offsets[-1] + size)
        if any(self.artifact.ids[i:i + ID_BYTES] not in repo.index
               for i in range(0, len(self.artifact.ids), ID_BYTES)):
            repo.refresh_index()
        self._cache: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._cache.clear()

    # ------------------------------------------------------------------ reading

    def pread(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes at `offset` (fewer only at the end), every chunk verified."""
        end = min(offset + max(n, 0), self.size)
        if end <= offset:
            return b""
        first = bisect.bisect_right(self._offsets, offset) - 1
        last = bisect.bisect_left(self._offsets, end)          # chunks first..last-1 cover the span
        chunks = []
        for i in range(first, last):
            chunk_id = self.artifact.ids[i * ID_BYTES:(i + 1) * ID_BYTES]
            size = self._offsets[i + 1] - self._offsets[i]
            where = self.repo.index.get(chunk_id)
            if where is None or where.length != size:
                raise IntegrityError(f"{self.what}: chunk {chunk_id.hex()[:12]} is in no index of {self.repo.url}; "
                                     f"the repository lost data ('stasis repo check' tells what)")
            chunks.append((self._offsets[i], chunk_id, size, where))
        with self._lock:
            blobs = {key: self._cache[key] for c in chunks if (key := (c[3].pack, c[3].blob_offset)) in self._cache}
        missing = [(offset_, cid, size) for offset_, cid, size, where in chunks
                   if (where.pack, where.blob_offset) not in blobs]
        if missing:
            blobs.update(self._fetch(missing))
        out = bytearray()
        for _, chunk_id, size, where in chunks:
            piece = blobs[(where.pack, where.blob_offset)][where.offset:where.offset + size]
            if self.repo.sealer.chunk_id(piece) != chunk_id:
                raise IntegrityError(f"{self.what}: chunk {chunk_id.hex()[:12]} does not match its id: it is damaged")
            out += piece
        skip = offset - self._offsets[first]
        return bytes(out[skip:skip + end - offset])

    def _fetch(self, window: list[tuple[int, bytes, int]]) -> dict[tuple[str, int], bytes]:
        """Load and open the blobs holding these chunks; remember them for the next read."""
        reads = self.repo._plan_reads(window, self.what)

        def run(read) -> list[tuple[tuple[str, int], bytes]]:
            pack, start, end, blobs = read
            data = self.repo._load_range(pack, start, end - start, self.what)
            with self._lock:
                self.fetched += len(data)
            return [((pack, blob_offset), decode_blob(self.repo.sealer, data[blob_offset - start:
                                                                             blob_offset - start + blob_length],
                                                      plain_length, f"{self.what}: blob at {blob_offset} of "
                                                                    f"pack {pack[:12]}"))
                    for blob_offset, blob_length, plain_length in blobs]

        if len(reads) == 1:
            opened = run(reads[0])
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.repo.io_workers)
            opened = [pair for part in self._pool.map(run, reads) for pair in part]
        with self._lock:
            for key, plain in opened:
                if key not in self._cache:
                    self._cache[key] = plain
                    self._cached += len(plain)
                self._cache.move_to_end(key)
            while self._cached > CACHE_BYTES and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
        return dict(opened)
