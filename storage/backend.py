"""The Backend seam: where repository objects live (a local folder, S3, memory for unit tests).

A backend stores opaque objects under slash-separated keys. It knows nothing of checkpoints; the
Repository builds the format on top. Implementations must make `save` atomic: a reader sees the
whole object or none of it.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import Iterator

from stasis.errors import InvalidArgument, NotFound

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class ObjectNotFound(NotFound):
    pass


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


class Backend(abc.ABC):
    #: a save of an existing key replaces it atomically
    atomic_replace: bool = True
    #: the backend can refuse a save when the key exists (put-if-absent); probed, not assumed, on S3
    conditional_put: bool = False

    @property
    @abc.abstractmethod
    def url(self) -> str: ...

    @abc.abstractmethod
    def save(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def load(self, key: str, offset: int = 0, length: int | None = None) -> bytes: ...

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo: ...

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    @abc.abstractmethod
    def remove(self, key: str) -> None: ...

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
            return True
        except ObjectNotFound:
            return False

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


def check_key(key: str) -> str:
    """Keys come from manifests read back from storage: refuse anything that could escape a folder."""
    if len(key) > 512 or not _KEY.match(key) or ".." in key.split("/"):
        raise InvalidArgument(f"invalid object key {key!r}")
    return key


def open_backend(url: str) -> Backend:
    """file:///path or s3://bucket/prefix (credentials and endpoint from the standard AWS_* variables)."""
    if url.startswith("file://"):
        from stasis.storage.local import LocalBackend
        return LocalBackend(url[len("file://"):])
    if url.startswith("s3://"):
        from stasis.storage.s3 import S3Backend
        return S3Backend.from_url(url)
    if url.startswith("memory://"):
        from stasis.storage.memory import MemoryBackend
        return MemoryBackend.named(url[len("memory://"):])
    if url.startswith("/"):
        from stasis.storage.local import LocalBackend
        return LocalBackend(url)
    raise InvalidArgument(f"unsupported repository URL {url!r}: use file:///path or s3://bucket/prefix")
