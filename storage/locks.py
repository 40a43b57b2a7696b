"""Repository locks, restic-style: shared for writers and readers, exclusive for prune.

Protocol: write your lock, then list the others; on a conflict with a live lock, delete yours and
wait or fail. Two racing parties both list after writing, so at least one sees the other. Holders
refresh their lock; a lock not refreshed for STALE seconds (or one of this host whose process is
gone) belongs to a crashed holder and is ignored.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid

import structlog

from stasis.errors import FailedPrecondition
from stasis.storage.backend import Backend, ObjectNotFound

log = structlog.get_logger("stasis.storage")
REFRESH = 30.0
STALE = 300.0


class Lock:
    def __init__(self, backend: Backend, kind: str, refresh: float = REFRESH):
        self.backend = backend
        self.kind = kind
        self.key = f"locks/{uuid.uuid4().hex}.json"
        self.created = time.time()
        self._refresh = refresh
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_ok = time.monotonic()

    def _write(self) -> None:
        body = {"kind": self.kind, "host": socket.gethostname(), "pid": os.getpid(),
                "created": self.created, "refreshed": time.time()}
        self.backend.save(self.key, json.dumps(body).encode())
        self._last_ok = time.monotonic()

    def check(self) -> None:
        """Before a commit: others may have judged this lock stale (refreshes failed, a long pause),
        and a prune may have run meanwhile. Then nothing may be committed."""
        if time.monotonic() - self._last_ok > STALE / 2 or not self.backend.exists(self.key):
            raise FailedPrecondition(f"lost the repository lock on {self.backend.url} (it could not be "
                                     f"refreshed); nothing was committed: try again")

    def acquire(self, wait: float = 0.0) -> "Lock":
        deadline = time.monotonic() + wait
        while True:
            self._write()
            try:
                holder = self._conflict()
            except BaseException:
                self._remove_quietly()
                raise
            if holder is None:
                break
            self.backend.remove(self.key)
            if time.monotonic() >= deadline:
                raise FailedPrecondition(
                    f"repository {self.backend.url} is locked by {holder['kind']} lock of "
                    f"{holder.get('host', '?')} pid {holder.get('pid', '?')} "
                    f"({_doing(holder)}); "
                    f"try again later")
            # Jittered, short: a waiting writer must not starve behind repeated prunes.
            time.sleep(min(random.uniform(0.1, 0.5), max(0.05, deadline - time.monotonic())))
        self._thread = threading.Thread(target=self._keep_fresh, name="stasis-lock", daemon=True)
        self._thread.start()
        return self

    def _conflict(self) -> dict | None:
        for info in self.backend.list("locks/"):
            if info.key == self.key:
                continue
            try:
                other = json.loads(self.backend.load(info.key))
            except (ObjectNotFound, ValueError, RecursionError):
                continue   # gone, or not a lock we understand: it cannot be honoured
            if not isinstance(other, dict) or is_stale(other):
                continue
            if self.kind == "exclusive" or other.get("kind") == "exclusive":
                return other
        return None

    def _keep_fresh(self) -> None:
        while not self._stop.wait(self._refresh):
            try:
                self._write()
            except Exception as exc:  # noqa: BLE001 - a missed refresh is retried next round
                log.warning("could not refresh repository lock", error=str(exc))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove_quietly()

    def _remove_quietly(self) -> None:
        try:
            self.backend.remove(self.key)
        except ObjectNotFound:
            pass

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_stale(lock: dict) -> bool:
    try:
        refreshed = float(lock.get("refreshed", 0))
    except (TypeError, ValueError, OverflowError):
        return True
    if time.time() - refreshed > STALE:   # a clock ahead of ours makes a lock look fresh: safe side
        return True
    pid = lock.get("pid")
    if lock.get("host") == socket.gethostname() and isinstance(pid, int) and 0 < pid < 1 << 22:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except (PermissionError, OverflowError):
            return False
    return False


def _doing(lock: dict) -> str:
    return "a prune is running" if lock.get("kind") == "exclusive" else "checkpoints are being written or read"
