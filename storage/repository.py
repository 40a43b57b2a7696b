"""The checkpoint repository, format version 2 (docs/repository-format.md).

Artifacts are cut into content-defined chunks; each distinct chunk is stored once, compressed and
sealed, in packs of tens of MiB listed by immutable index files; the sealed manifest is written last
and is the single commit point. Reads authenticate and re-hash every chunk before writing a byte.

Writes run as a pipeline: the caller's thread cuts chunks, a pool hashes, compresses and seals
them, and a second pool uploads finished packs, with bounded queues in between so memory stays at
about (workers x max chunk) + (uploads in flight x pack size) whatever the artifact's size.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

import structlog

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, StasisError
from stasis.storage import keys as keyfiles
from stasis.storage.backend import Backend, ObjectNotFound, open_backend
from stasis.storage.chunker import DEFAULT as DEFAULT_CHUNKER
from stasis.storage.chunker import ChunkerParams, pieces
from stasis.storage.crypto import AeadSealer, Sealer
from stasis.storage.locks import Lock
from stasis.storage.manifest import CHECKPOINT_ID, Artifact, Manifest
from stasis.storage.pack import (GROUP_BYTES, GROUP_CHUNKS, HEX64, MAX_BLOB_PLAIN, Location, PackBuilder,
                                 decode_blob,
                                 decode_index, encode_blob, encode_index, locations, pack_key)

log = structlog.get_logger("stasis.storage")
REPO_FORMAT = "stasis-repository"
REPO_VERSION = 2
DEFAULT_PACK_SIZE = 32 << 20
MAX_KEY_FILES = 32
MAX_READ = 16 << 20       # one ranged GET covers neighbouring blobs up to this size
READ_GAP = 256 << 10      # and skips over at most this much unneeded data to do so
Progress = Callable[[int, int], None]


class RepositoryMissing(FailedPrecondition):
    """There is no repository at this URL (yet)."""


def new_checkpoint_id() -> str:
    return uuid.uuid4().hex[:16]


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class RepoConfig:
    id: str
    encryption: str
    chunker: ChunkerParams
    pack_size: int
    created: str


class Repository:
    def __init__(self, backend: Backend, sealer: Sealer, config: RepoConfig, workers: int | None = None,
                 io_workers: int = 4):
        self.backend = backend
        self.sealer = sealer
        self.config = config
        # Hashing, compression and sealing hold the GIL for part of each call: more threads than
        # cores only add contention (measured: 8 threads were 1.5-2x slower than 2 on 2 cores).
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.io_workers = io_workers   # ranged GETs in flight while reading
        self.index: dict[bytes, Location] = {}
        self.packs: dict[str, int] = {}
        self.loaded_indexes: set[str] = set()
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def encrypted(self) -> bool:
        return self.sealer.encrypted

    # ------------------------------------------------------------------ init / open

    @classmethod
    def init(cls, url: str, password: str | None, encrypt: bool = True,
             chunker: dict | None = None, pack_size: int = DEFAULT_PACK_SIZE) -> "Repository":
        """Create a repository; refuses to touch an existing one."""
        backend = open_backend(url)
        if hasattr(backend, "ensure_bucket"):
            backend.ensure_bucket()
        if backend.exists("config"):
            raise FailedPrecondition(f"{backend.url} already holds a repository")
        if next(iter(backend.list("")), None) is not None:
            # Keys or checkpoints without a config: a damaged repository, never to be overwritten.
            raise FailedPrecondition(f"{backend.url} is not empty but has no repository config; "
                                     f"refusing to create a repository over it")
        if encrypt and not password:
            raise InvalidArgument("an encrypted repository needs a password: set STASIS_PASSWORD or "
                                  "--password-file (or choose --no-encryption)")
        params = ChunkerParams.from_json(chunker or DEFAULT_CHUNKER)
        body = {"chunker": params.to_json(), "compression": "zstd", "pack_size": pack_size,
                "created": now_rfc3339()}
        envelope = {"format": REPO_FORMAT, "version": REPO_VERSION, "id": uuid.uuid4().hex}
        if encrypt:
            master = keyfiles.MasterKey.generate()
            sealer: Sealer = AeadSealer(master.encryption_key, master.id_key)
            backend.save(f"keys/{uuid.uuid4().hex}.json", keyfiles.wrap(master, password, now_rfc3339()))
            envelope.update(encryption=sealer.scheme,
                            body=base64.b64encode(sealer.seal(json.dumps(body).encode(), b"config")).decode())
        else:
            body["id_key"] = base64.b64encode(os.urandom(32)).decode()
            envelope.update(encryption="none", body=body)
        backend.save("config", json.dumps(envelope, indent=1).encode())
        return cls.open(url, password, backend)

    @classmethod
    def open(cls, url: str, password: str | None = None, backend: Backend | None = None) -> "Repository":
        backend = backend or open_backend(url)
        missing = RepositoryMissing(f"no stasis repository at {backend.url}; create one with "
                                    f"'stasis repo init {backend.url}'")
        if hasattr(backend, "bucket_exists") and not backend.bucket_exists():
            raise missing
        try:
            raw = backend.load("config")
        except ObjectNotFound:
            raise missing from None
        try:
            envelope = json.loads(raw)
            if not isinstance(envelope, dict) or envelope.get("format") != REPO_FORMAT:
                raise ValueError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise IntegrityError(f"{backend.url}/config is not a stasis repository config") from None
        if envelope.get("version") != REPO_VERSION:
            raise FailedPrecondition(f"repository {backend.url} has format version {envelope.get('version')}; "
                                     f"this stasis reads version {REPO_VERSION}: upgrade stasis")
        scheme = envelope.get("encryption")
        key_files = [i.key for i in backend.list("keys/")]
        if scheme == "none":
            # Someone who can write the bucket must not be able to swap in a plaintext repository:
            # whoever holds a password expects encryption, and gets it or an error.
            if key_files or password:
                raise IntegrityError(f"{backend.url} is not encrypted, but "
                                     f"{'key files exist' if key_files else 'a password was given'}: refusing "
                                     f"(a plaintext repository in place of an encrypted one is an attack)")
            body = envelope.get("body")
            try:
                sealer: Sealer = Sealer(base64.b64decode(body["id_key"]))
            except (KeyError, TypeError, ValueError):
                raise IntegrityError(f"{backend.url}/config is malformed") from None
        elif scheme == "aes-256-gcm":
            if not password:
                raise FailedPrecondition(f"repository {backend.url} is encrypted: set STASIS_PASSWORD "
                                         f"or --password-file")
            sealer, body = cls._unlock_config(backend, key_files, password, envelope.get("body", ""))
        else:
            raise FailedPrecondition(f"repository {backend.url} uses encryption {scheme!r}, unknown to this stasis")
        try:
            config = RepoConfig(str(envelope["id"]), scheme, ChunkerParams.from_json(body["chunker"]),
                                int(body["pack_size"]), str(body.get("created", "")))
            assert 1 << 20 <= config.pack_size <= 1 << 30
        except (KeyError, TypeError, ValueError, AssertionError):
            raise IntegrityError(f"{backend.url}/config is malformed") from None
        # The chunk index loads on demand (lock(), fetch_file, image_artifact, maintenance): a
        # controller that only lists manifests never pays for it.
        return cls(backend, sealer, config)

    @classmethod
    def _unlock_config(cls, backend: Backend, key_files: list[str], password: str, body: str):
        """The master key that opens the config: a key file that unwraps but does not open the config
        (left by an interrupted init, or planted) is passed over."""
        wrong_config = False
        for master in cls._masters(backend, key_files, password):
            sealer = AeadSealer(master.encryption_key, master.id_key)
            try:
                return sealer, json.loads(sealer.open(base64.b64decode(body), b"config", "config"))
            except IntegrityError:
                wrong_config = True
            except (ValueError, TypeError, RecursionError):
                raise IntegrityError(f"{backend.url}/config is malformed") from None
        if wrong_config:
            raise IntegrityError(f"{backend.url}/config failed authentication with every key this password opens")
        raise keyfiles.PermissionDenied(f"wrong password for repository {backend.url}")

    @staticmethod
    def _masters(backend: Backend, key_files: list[str], password: str):
        if not key_files:
            raise IntegrityError(f"repository {backend.url} is encrypted but has no key files")
        for key in key_files[:MAX_KEY_FILES]:   # each costs a deliberate scrypt: bounded
            try:
                yield keyfiles.unwrap(backend.load(key), password, key)
            except StasisError:
                continue

    @classmethod
    def _unlock(cls, backend: Backend, key_files: list[str], password: str) -> keyfiles.MasterKey:
        for master in cls._masters(backend, key_files, password):
            return master
        raise keyfiles.PermissionDenied(f"wrong password for repository {backend.url}")

    # ------------------------------------------------------------------ keys

    def add_key(self, master_password: str, new_password: str) -> str:
        master = self._unlock(self.backend, [i.key for i in self.backend.list("keys/")], master_password)
        key = f"keys/{uuid.uuid4().hex}.json"
        self.backend.save(key, keyfiles.wrap(master, new_password, now_rfc3339()))
        return key.split("/")[1][:-5]

    def key_ids(self) -> list[str]:
        return [i.key.split("/")[1][:-5] for i in self.backend.list("keys/")]

    def remove_key(self, key_id: str) -> None:
        if not re.match(r"^[0-9a-f]{32}$", key_id or ""):
            raise InvalidArgument(f"key id {key_id!r} is malformed")
        if len(self.key_ids()) <= 1:
            raise FailedPrecondition("refusing to remove the last key: the repository would be unreadable")
        try:
            self.backend.remove(f"keys/{key_id}.json")
        except ObjectNotFound:
            raise NotFound(f"no key {key_id} in {self.url}") from None

    # ------------------------------------------------------------------ locks

    def lock(self, kind: str = "shared", wait: float = 60.0) -> Lock:
        """Take a lock, then bring the index up to date: what a prune changed before is seen."""
        lock = Lock(self.backend, kind).acquire(wait)
        try:
            self.refresh_index()
        except BaseException:
            lock.release()
            raise
        return lock

    # ------------------------------------------------------------------ index

    def refresh_index(self) -> int:
        """Load index files written since the last refresh (by this or any other writer).

        When an index file we loaded is gone, a prune replaced it and may have deleted packs it
        named: everything is reloaded, so nothing (a dedup decision above all) relies on them.
        """
        names = [i.key for i in self.backend.list("index/")]
        listed = {k[6:-5] for k in names}
        with self._lock:
            if not self.loaded_indexes <= listed:
                self.index, self.packs, self.loaded_indexes = {}, {}, set()
        new = [k for k in names if k.endswith(".json") and k[6:-5] not in self.loaded_indexes
               and HEX64.match(k[6:-5])]
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            loaded = list(pool.map(self._load_index, new))
        with self._lock:
            for index_id, packs in loaded:
                if packs is None:
                    continue
                self._merge(packs)
                self.loaded_indexes.add(index_id)
        return len(loaded)

    def _load_index(self, key: str) -> tuple[str, dict | None]:
        index_id = key[6:-5]
        try:
            return index_id, decode_index(self.sealer, self.backend.load(key), index_id)
        except ObjectNotFound:   # deleted by a concurrent prune after a new index replaced it
            return index_id, None
        except IntegrityError as exc:
            # A damaged or planted index must not make the whole repository unreadable; what it
            # alone described shows up as missing chunks, and `repo check` reports it.
            log.warning("skipping unreadable index file", index=index_id[:12], error=exc.message)
            return index_id, None

    def _merge(self, packs: dict[str, dict]) -> None:
        for pack_id, table in packs.items():
            self.packs[pack_id] = table["size"]
            for chunk_id, where in locations(pack_id, table):
                self.index.setdefault(chunk_id, where)

    def read_index_file(self, index_id: str) -> dict[str, dict]:
        """One index file, decoded: {pack id: info} (for check and prune)."""
        if not HEX64.match(index_id):
            raise IntegrityError(f"index/{index_id}.json has a malformed name")
        return decode_index(self.sealer, self.backend.load(f"index/{index_id}.json"), index_id)

    def write_index(self, packs: dict[str, dict]) -> str:
        index_id, data = encode_index(self.sealer, packs)
        self.backend.save(f"index/{index_id}.json", data)
        with self._lock:
            self._merge(packs)
            self.loaded_indexes.add(index_id)
        return index_id

    # ------------------------------------------------------------------ writing

    def store_file(self, path: str, progress: Progress | None = None,
                   media_type: str = "application/x-tar", lock: Lock | None = None,
                   stats: dict | None = None) -> Artifact:
        """Store a file as chunks (new ones grouped, compressed, sealed, packed); return its artifact.

        With `lock`, the lock is verified to be still held before the index is written."""
        writer = PackWriter(self, lock=lock)
        total = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)

        def chunks() -> Iterator[tuple[bytes, int]]:
            done = 0
            for listed in writer.run(fd, pieces(path, self.config.chunker)):
                yield from listed
                done += sum(size for _, size in listed)
                if progress:
                    progress(done, total)

        try:
            artifact = Artifact.build(chunks(), media_type)
            writer.close()
        finally:
            writer.abort()
            os.close(fd)
        if stats is not None:   # what dedup left to store (compressed, sealed)
            stats["new_bytes"] = stats.get("new_bytes", 0) + writer.stored_bytes
        if progress:
            progress(total, total)
        return artifact

    def write_manifest(self, manifest: Manifest, lock: Lock | None = None) -> None:
        # Every chunk the manifest names is in an index before it: the manifest is the commit point.
        missing = [i for art in (manifest.checkpoint, manifest.image) if art for i, _ in art.chunks()
                   if i not in self.index]
        if missing:
            raise IntegrityError(f"checkpoint {manifest.id}: {len(missing)} chunks are not stored; not committing")
        if lock is not None:
            lock.check()   # a writer whose lock went stale may have lost its chunks to a prune
        self.backend.save(f"checkpoints/{manifest.id}.json",
                          self.sealer.seal(manifest.to_bytes(), f"checkpoint:{manifest.id}".encode()))

    # ------------------------------------------------------------------ reading

    def fetch_file(self, artifact: Artifact, path: str, progress: Progress | None = None,
                   what: str = "checkpoint") -> None:
        """Write an artifact to `path`; every chunk is authenticated and re-hashed before it is written."""
        if any(i not in self.index for i, _ in artifact.chunks()):
            self.refresh_index()
        done = 0
        lock = threading.Lock()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pool = concurrent.futures.ThreadPoolExecutor(self.io_workers)
        try:
            def run(read: tuple[str, int, int, dict]) -> None:
                nonlocal done
                pack, start, end, blobs = read
                data = self._load_range(pack, start, end - start, what)
                written = 0
                for (blob_offset, blob_length, plain_length), uses in blobs.items():
                    label = f"{what}: blob at {blob_offset} of pack {pack[:12]}"
                    plain = decode_blob(self.sealer, data[blob_offset - start:blob_offset - start + blob_length],
                                        plain_length, label)
                    written += self._write_uses(fd, plain, uses, label)
                with lock:
                    done += written
                    if progress:
                        progress(done, artifact.size)

            # The plan is made a window at a time, so its size stays bounded however big the artifact.
            for window in self._windows(artifact):
                futures = [pool.submit(run, r) for r in self._plan_reads(window, what)]
                for fut in concurrent.futures.as_completed(futures):
                    fut.result()   # the first failure raises; the rest are cancelled below
            os.ftruncate(fd, artifact.size)
            os.fsync(fd)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)

    WINDOW = 16384   # chunks planned at once (64 MiB of 4 KiB chunks)

    def _windows(self, artifact: Artifact) -> Iterator[list[tuple[int, bytes, int]]]:
        window: list[tuple[int, bytes, int]] = []
        offset = 0
        for chunk_id, size in artifact.chunks():
            window.append((offset, chunk_id, size))
            offset += size
            if len(window) >= self.WINDOW:
                yield window
                window = []
        if window:
            yield window

    def _write_uses(self, fd: int, plain: bytes, uses: list[tuple[int, int, int, bytes]], label: str) -> int:
        """Verify each chunk taken from a blob, then write runs that are contiguous in both at once."""
        uses.sort()
        written = 0
        # A chunk used many times (zero pages) is hashed once; zero chunks are not written at all:
        # the file is truncated to its size at the end, and holes read back as zeros.
        zero: dict[tuple[int, bytes], bool] = {}
        run_file = run_plain = run_len = -1
        for file_offset, offset, length, chunk_id in uses:
            key = (offset, chunk_id)
            if key not in zero:
                piece = plain[offset:offset + length]
                if self.sealer.chunk_id(piece) != chunk_id:
                    raise IntegrityError(f"{label}: chunk {chunk_id.hex()[:12]} does not match its id: "
                                         f"it is damaged")
                zero[key] = piece.count(0) == length
            written += length
            if zero[key]:
                continue
            if run_len >= 0 and file_offset == run_file + run_len and offset == run_plain + run_len:
                run_len += length
                continue
            if run_len > 0:
                _pwrite(fd, plain[run_plain:run_plain + run_len], run_file)
            run_file, run_plain, run_len = file_offset, offset, length
        if run_len > 0:
            _pwrite(fd, plain[run_plain:run_plain + run_len], run_file)
        return written

    def _plan_reads(self, window: list[tuple[int, bytes, int]], what: str) -> list[tuple[str, int, int, dict]]:
        """Group chunks by blob, and blobs of a pack into ranged reads of at most MAX_READ."""
        by_pack: dict[str, dict] = collections.defaultdict(lambda: collections.defaultdict(list))
        for file_offset, chunk_id, size in window:
            where = self.index.get(chunk_id)
            if where is None or where.length != size:
                raise IntegrityError(f"{what}: chunk {chunk_id.hex()[:12]} is in no index of {self.url}; "
                                     f"the repository lost data ('stasis repo check' tells what)")
            by_pack[where.pack][(where.blob_offset, where.blob_length, where.blob_plain)].append(
                (file_offset, where.offset, size, chunk_id))
        reads = []
        for pack, blobs in by_pack.items():
            group: dict = {}
            start = end = -1
            for key in sorted(blobs):
                o, n = key[0], key[1]
                if group and o <= end + READ_GAP and max(end, o + n) - start <= MAX_READ:
                    group[key] = blobs[key]
                    end = max(end, o + n)
                    continue
                if group:
                    reads.append((pack, start, end, group))
                group, start, end = {key: blobs[key]}, o, o + n
            if group:
                reads.append((pack, start, end, group))
        return reads

    def _load_range(self, pack: str, offset: int, length: int, what: str) -> bytes:
        try:
            data = self.backend.load(pack_key(pack), offset, length)
        except ObjectNotFound:
            raise IntegrityError(f"{what}: pack {pack[:12]} is missing from {self.url}; "
                                 f"'stasis repo check' lists what it affects") from None
        if len(data) != length:
            raise IntegrityError(f"{what}: pack {pack[:12]} in {self.url} is truncated")
        return data

    # ------------------------------------------------------------------ images

    def _image_key(self, image_id: str) -> str:
        return f"images/{self.sealer.name_of(image_id)}.json"

    def image_artifact(self, image_id: str) -> Artifact | None:
        """The stored archive of an image, if an earlier checkpoint shipped it and it is intact."""
        if not HEX64.match(image_id):
            return None
        key = self._image_key(image_id)
        try:
            raw = self.sealer.open(self.backend.load(key), key.encode(), key)
            artifact = Artifact.from_json(json.loads(raw), key)
        except (ObjectNotFound, IntegrityError, ValueError):
            return None
        if any(i not in self.index for i, _ in artifact.chunks()):
            self.refresh_index()
            if any(i not in self.index for i, _ in artifact.chunks()):
                return None
        return artifact

    def remember_image(self, image_id: str, artifact: Artifact) -> None:
        if HEX64.match(image_id):
            key = self._image_key(image_id)
            self.backend.save(key, self.sealer.seal(json.dumps(artifact.to_json()).encode(), key.encode()))

    # ------------------------------------------------------------------ manifests

    def read_manifest(self, checkpoint_id: str) -> Manifest:
        ident = self.resolve(checkpoint_id)
        try:
            raw = self.backend.load(f"checkpoints/{ident}.json")
        except ObjectNotFound:
            raise NotFound(f"no checkpoint {checkpoint_id!r} in {self.url}") from None
        body = self.sealer.open(raw, f"checkpoint:{ident}".encode(), f"checkpoint {ident}")
        manifest = Manifest.from_bytes(body, f"checkpoint {ident}")
        if manifest.id != ident:
            raise IntegrityError(f"checkpoint {ident}: manifest names itself {manifest.id}; the repository is damaged")
        return manifest

    def checkpoint_ids(self) -> list[str]:
        ids = []
        for info in self.backend.list("checkpoints/"):
            name = info.key.rsplit("/", 1)[-1]
            if name.endswith(".json") and CHECKPOINT_ID.match(name[:-5]):
                ids.append(name[:-5])
        return ids

    def manifests(self) -> Iterator[Manifest]:
        for ident in self.checkpoint_ids():
            yield self.read_manifest(ident)

    def remove_checkpoint(self, checkpoint_id: str) -> str:
        """Forget a checkpoint (its data goes at the next prune)."""
        ident = self.resolve(checkpoint_id)
        try:
            self.backend.remove(f"checkpoints/{ident}.json")
        except ObjectNotFound:
            raise NotFound(f"no checkpoint {checkpoint_id!r} in {self.url}") from None
        return ident

    def resolve(self, prefix: str) -> str:
        """A full checkpoint id from a unique prefix of at least 4 characters (like git)."""
        if not re.match(r"^[0-9a-f]{4,16}$", prefix or ""):
            raise InvalidArgument(f"checkpoint id {prefix!r} is malformed: give at least 4 hex digits")
        if len(prefix) == 16:
            return prefix
        matches = [i for i in self.checkpoint_ids() if i.startswith(prefix)]
        if not matches:
            raise NotFound(f"no checkpoint {prefix!r} in {self.url}; list them with 'stasis checkpoints'")
        if len(matches) > 1:
            raise InvalidArgument(f"checkpoint id {prefix!r} is ambiguous ({len(matches)} match); give more digits")
        return matches[0]


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    try:
        while view:   # a short write (full disk) must not pass silently
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    except OSError as exc:
        raise StasisError(f"cannot write the restored file: {exc.strerror}") from None


class PackWriter:
    """The write pipeline: groups of chunks -> (hash, dedup, compress, seal) in a pool -> packs ->
    upload pool. Results are consumed in order, so the artifact lists chunks as they were cut."""

    def __init__(self, repo: Repository, uploads_in_flight: int = 2, lock: Lock | None = None):
        self.repo = repo
        self.lock = lock
        self.encoders = concurrent.futures.ThreadPoolExecutor(repo.workers)
        self.uploaders = concurrent.futures.ThreadPoolExecutor(uploads_in_flight)
        self.upload_slots = threading.BoundedSemaphore(uploads_in_flight)
        self.uploads: list[concurrent.futures.Future] = []
        self.pack = PackBuilder()
        self.written: dict[str, dict] = {}   # this writer's packs, for its index file
        self.pending: set[bytes] = set()     # new chunks already placed in this writer's packs
        self.stored_bytes = 0

    def _encode(self, fd: int, group: list[tuple[int, int]]):
        """Read and hash a run of chunks; compress and seal those the repository does not have."""
        base, end = group[0][0], group[-1][1]
        span = os.pread(fd, end - base, base)
        if len(span) != end - base:
            raise StasisError("the file changed size while it was being stored")
        group = [span[s - base:e - base] for s, e in group]
        chunk_id = self.repo.sealer.chunk_id
        known = self.repo.index
        ids = [chunk_id(d) for d in group]
        members, parts, offset, seen = [], [], 0, set()
        for cid, data in zip(ids, group, strict=True):
            if cid in known or cid in seen:
                continue
            seen.add(cid)
            members.append((cid, offset, len(data)))
            parts.append(data)
            offset += len(data)
        blob = encode_blob(self.repo.sealer, b"".join(parts)) if parts else None
        return [(cid, len(d)) for cid, d in zip(ids, group, strict=True)], members, blob, offset

    def run(self, fd: int, cuts: Iterator[tuple[int, int]]) -> Iterator[list[tuple[bytes, int]]]:
        """Yield the (chunk id, size) of every chunk, in order and a group at a time, while new
        chunks are packed and uploaded. Workers read their own bytes (pread): this thread only plans."""
        pending: collections.deque = collections.deque()
        limit = self.repo.workers * 4
        group: list[tuple[int, int]] = []
        for start, end in cuts:
            if group and end - group[0][0] > MAX_BLOB_PLAIN:   # a blob never exceeds what readers accept
                pending.append(self.encoders.submit(self._encode, fd, group))
                group = []
            group.append((start, end))
            if len(group) >= GROUP_CHUNKS or end - group[0][0] >= GROUP_BYTES:
                pending.append(self.encoders.submit(self._encode, fd, group))
                group = []
                while pending and (len(pending) >= limit or pending[0].done()):
                    yield self._take(pending.popleft().result())
        if group:
            pending.append(self.encoders.submit(self._encode, fd, group))
        while pending:
            yield self._take(pending.popleft().result())

    def _take(self, result) -> list[tuple[bytes, int]]:
        listed, members, blob, plain_length = result
        if blob is not None:
            # Another group in flight may have placed the same chunk: list each id once.
            fresh = [m for m in members if m[0] not in self.pending and m[0] not in self.repo.index]
            if fresh:
                self.pending.update(m[0] for m in fresh)
                self.pack.add(blob, plain_length, fresh)
                self.stored_bytes += len(blob)
                if self.pack.size >= self.repo.config.pack_size:
                    self._flush()
        return listed

    def _flush(self) -> None:
        if not self.pack.blobs:
            return
        pack_id, data, table = self.pack.finish(self.repo.sealer)
        self.pack = PackBuilder()
        self.written[pack_id] = table
        self.upload_slots.acquire()   # back-pressure: at most N finished packs wait in memory

        def upload() -> None:
            try:
                self.repo.backend.save(pack_key(pack_id), data)
            finally:
                self.upload_slots.release()
        self.uploads.append(self.uploaders.submit(upload))
        for fut in [f for f in self.uploads if f.done()]:
            fut.result()   # surface a failed upload early

    def close(self) -> None:
        """Upload the last pack, wait for every upload, then write this writer's index file."""
        self._flush()
        for fut in self.uploads:
            fut.result()
        if self.written:
            if self.lock is not None:
                self.lock.check()
            self.repo.write_index(self.written)

    def abort(self) -> None:
        self.encoders.shutdown(wait=True, cancel_futures=True)
        self.uploaders.shutdown(wait=True, cancel_futures=True)
