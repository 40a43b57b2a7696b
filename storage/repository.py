"""The checkpoint repository: content objects named by their sha256, manifests written last.

Layout (docs/repository-format.md):
    config                          what this is, its format version, the chunk size
    objects/<2 hex>/<sha256>        content objects: pieces of checkpoint and image archives
    checkpoints/<id>.json           one manifest per checkpoint; the commit point
    images/<image id>.json          which artifact holds an image already (lets checkpoints reuse it)

Files move in fixed-size chunks, several at once, so memory stays bounded (workers x chunk size)
whatever the checkpoint's size. Every chunk read back is hashed before a byte of it is written out.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import threading
import uuid
from datetime import datetime, timezone
from typing import Callable, Iterator

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from stasis.storage.backend import Backend, ObjectNotFound, open_backend
from stasis.storage.manifest import CHECKPOINT_ID, Artifact, Chunk, Manifest

REPO_FORMAT = "stasis-repository"
REPO_VERSION = 1
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
Progress = Callable[[int, int], None]
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")


def new_checkpoint_id() -> str:
    return uuid.uuid4().hex[:16]


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Repository:
    def __init__(self, backend: Backend, chunk_size: int, workers: int = 8):
        self.backend = backend
        self.chunk_size = chunk_size
        self.workers = workers

    @property
    def url(self) -> str:
        return self.backend.url

    # ------------------------------------------------------------------ opening

    @classmethod
    def init(cls, url: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> "Repository":
        """Create the repository if it does not exist; open it if it does."""
        backend = open_backend(url)
        if hasattr(backend, "ensure_bucket"):
            backend.ensure_bucket()
        if not backend.exists("config"):
            config = {"format": REPO_FORMAT, "version": REPO_VERSION, "id": uuid.uuid4().hex,
                      "created": now_rfc3339(), "chunk_size": chunk_size}
            backend.save("config", json.dumps(config, indent=1).encode())
        return cls.open(url, backend)

    @classmethod
    def open(cls, url: str, backend: Backend | None = None) -> "Repository":
        backend = backend or open_backend(url)
        try:
            raw = backend.load("config")
        except ObjectNotFound:
            raise FailedPrecondition(f"no stasis repository at {backend.url}; create one with "
                                     f"'stasis repo init {backend.url}'") from None
        try:
            config = json.loads(raw)
            assert config["format"] == REPO_FORMAT
            chunk_size = int(config["chunk_size"])
            assert 64 * 1024 <= chunk_size <= 256 * 1024 * 1024
        except (ValueError, KeyError, TypeError, AssertionError):
            raise IntegrityError(f"{backend.url}/config is not a stasis repository config") from None
        if config.get("version") != REPO_VERSION:
            raise FailedPrecondition(f"repository {backend.url} has format version {config.get('version')}; "
                                     f"this stasis reads version {REPO_VERSION}: upgrade stasis")
        return cls(backend, chunk_size)

    # ------------------------------------------------------------------ objects

    @staticmethod
    def object_key(digest: str) -> str:
        return f"objects/{digest[:2]}/{digest}"

    def store_file(self, path: str, progress: Progress | None = None,
                   media_type: str = "application/x-tar") -> Artifact:
        """Upload a file as content-addressed chunks, several in flight, and return its artifact."""
        total = os.path.getsize(path)
        chunks: list[Chunk | None] = []
        done = 0
        lock = threading.Lock()
        failed = threading.Event()
        # At most 2 x workers chunks are read and not yet stored: that is the memory bound.
        slots = threading.BoundedSemaphore(self.workers * 2)

        def put(index: int, data: bytes) -> None:
            nonlocal done
            try:
                digest = hashlib.sha256(data).hexdigest()
                key = self.object_key(digest)
                if not self.backend.exists(key):  # identical content is stored once
                    self.backend.save(key, data)
                chunks[index] = Chunk(digest, len(data))
                with lock:
                    done += len(data)
                    if progress:
                        progress(done, total)
            except BaseException:
                failed.set()   # stop reading: the first failure decides the outcome
                raise
            finally:
                slots.release()

        pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        futures = []
        try:
            with open(path, "rb") as f:
                while not failed.is_set():
                    slots.acquire()
                    data = f.read(self.chunk_size)
                    if not data:
                        slots.release()
                        break
                    chunks.append(None)
                    futures.append(pool.submit(put, len(chunks) - 1, data))
            for fut in futures:
                fut.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return Artifact(total, tuple(c for c in chunks if c is not None), media_type)

    def fetch_file(self, artifact: Artifact, path: str, progress: Progress | None = None,
                   what: str = "checkpoint") -> None:
        """Download an artifact into `path`, verifying every chunk's sha256 before writing it."""
        done = 0
        lock = threading.Lock()
        offsets = []
        pos = 0
        for c in artifact.chunks:
            offsets.append(pos)
            pos += c.size

        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pool = concurrent.futures.ThreadPoolExecutor(self.workers)
        try:
            def get(chunk: Chunk, offset: int) -> None:
                nonlocal done
                data = self.load_object(chunk, what)
                os.pwrite(fd, data, offset)
                with lock:
                    done += len(data)
                    if progress:
                        progress(done, artifact.size)

            # A chunk is held only while its worker runs: at most `workers` chunks in memory.
            futures = [pool.submit(get, c, o) for c, o in zip(artifact.chunks, offsets, strict=True)]
            for fut in concurrent.futures.as_completed(futures):
                fut.result()   # the first bad chunk raises; the rest are cancelled below
            os.ftruncate(fd, artifact.size)
            os.fsync(fd)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)

    def load_object(self, chunk: Chunk, what: str = "checkpoint") -> bytes:
        try:
            data = self.backend.load(self.object_key(chunk.sha256))
        except ObjectNotFound:
            raise IntegrityError(f"{what}: object {chunk.sha256[:16]}… is missing from {self.url}; "
                                 f"the checkpoint cannot be restored") from None
        if len(data) != chunk.size or hashlib.sha256(data).hexdigest() != chunk.sha256:
            raise IntegrityError(f"{what}: object {chunk.sha256[:16]}… in {self.url} is corrupted "
                                 f"(hash mismatch); refusing to use it")
        return data

    # ------------------------------------------------------------------ images

    def image_artifact(self, image_id: str) -> Artifact | None:
        """The stored archive of an image, if a previous checkpoint shipped it and it is intact."""
        if not _IMAGE_ID.match(image_id):
            return None
        try:
            artifact = Artifact.from_json(json.loads(self.backend.load(f"images/{image_id}.json")),
                                          f"images/{image_id}.json")
        except (ObjectNotFound, IntegrityError, ValueError):
            return None
        for c in artifact.chunks:
            if not self.backend.exists(self.object_key(c.sha256)):
                return None
        return artifact

    def remember_image(self, image_id: str, artifact: Artifact) -> None:
        if _IMAGE_ID.match(image_id):
            self.backend.save(f"images/{image_id}.json", json.dumps(artifact.to_json()).encode())

    # ------------------------------------------------------------------ manifests

    def write_manifest(self, manifest: Manifest) -> None:
        # Every object the manifest names is stored before it: the manifest is the commit point.
        self.backend.save(f"checkpoints/{manifest.id}.json", manifest.to_bytes())

    def read_manifest(self, checkpoint_id: str) -> Manifest:
        ident = self.resolve(checkpoint_id)
        try:
            raw = self.backend.load(f"checkpoints/{ident}.json")
        except ObjectNotFound:
            raise NotFound(f"no checkpoint {checkpoint_id!r} in {self.url}") from None
        manifest = Manifest.from_bytes(raw, f"checkpoint {ident}")
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
