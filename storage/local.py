"""A repository in a local folder: the embedded default (file:///var/lib/stasis/repo)."""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

from stasis.errors import StasisError
from stasis.storage.backend import Backend, ObjectInfo, ObjectNotFound, check_key


class LocalBackend(Backend):
    atomic_replace = True
    conditional_put = True  # os.link refuses an existing name

    def __init__(self, root: str):
        if not root.startswith("/"):
            raise StasisError(f"local repository path must be absolute, got {root!r}")
        # Not created here: a mistyped path must read as "no repository", not as a new empty one.
        self.root = os.path.normpath(root)

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def save(self, key: str, data: bytes) -> None:
        # Temp file, fsync, rename, fsync the folder: after a crash the key holds the old object
        # or the new one, never a torn one.
        path = self._path(key)
        folder = os.path.dirname(path)
        tmp = ""
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _os_error(exc, key, self.url) from None
        except BaseException:
            _unlink_quietly(tmp)
            raise
        _fsync_dir(folder)

    def load(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                f.seek(offset)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} is missing from {self.url}") from None
        except OSError as exc:
            raise _os_error(exc, key, self.url) from None

    def stat(self, key: str) -> ObjectInfo:
        try:
            return ObjectInfo(key, os.stat(self._path(key)).st_size)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} is missing from {self.url}") from None
        except OSError as exc:
            raise _os_error(exc, key, self.url) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = os.path.join(self.root, os.path.dirname(prefix))
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root)
                if key.startswith(prefix):
                    try:
                        yield ObjectInfo(key, os.stat(full).st_size)
                    except FileNotFoundError:
                        continue

    def remove(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} is missing from {self.url}") from None


def _os_error(exc: OSError, key: str, url: str) -> StasisError:
    # Full disk, no permission, read-only file system: one line naming the object and the cause.
    return StasisError(f"cannot access {key} in {url}: {exc.strerror or exc}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    if not path:
        return
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
