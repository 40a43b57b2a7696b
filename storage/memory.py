"""An in-memory backend for unit tests of the logic above the Backend seam."""

from __future__ import annotations

import threading
from typing import Iterator

from stasis.storage.backend import Backend, ObjectInfo, ObjectNotFound, check_key

_NAMED: dict[str, "MemoryBackend"] = {}


class MemoryBackend(Backend):
    atomic_replace = True
    conditional_put = True

    def __init__(self, name: str = "test"):
        self.name = name
        self.objects: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def named(cls, name: str) -> "MemoryBackend":
        return _NAMED.setdefault(name, cls(name))

    @property
    def url(self) -> str:
        return f"memory://{self.name}"

    def save(self, key: str, data: bytes) -> None:
        with self._lock:
            self.objects[check_key(key)] = bytes(data)

    def load(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._lock:
            try:
                data = self.objects[check_key(key)]
            except KeyError:
                raise ObjectNotFound(f"object {key} is missing from {self.url}") from None
        return data[offset:] if length is None else data[offset:offset + length]

    def stat(self, key: str) -> ObjectInfo:
        with self._lock:
            try:
                return ObjectInfo(key, len(self.objects[check_key(key)]))
            except KeyError:
                raise ObjectNotFound(f"object {key} is missing from {self.url}") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._lock:
            items = sorted((k, len(v)) for k, v in self.objects.items() if k.startswith(prefix))
        for key, size in items:
            yield ObjectInfo(key, size)

    def remove(self, key: str) -> None:
        with self._lock:
            if self.objects.pop(check_key(key), None) is None:
                raise ObjectNotFound(f"object {key} is missing from {self.url}")
