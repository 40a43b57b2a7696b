"""Memory for the pages a direct migration will bring, made ready before the source freezes.

The destination writes the container's memory pages into files beside podman's storage, where
CRIU reads them at restore (tar_split). Writing a GiB into page cache the kernel must first
allocate took here 0.2-1.0 s alone and about 2 s while CRIU wrote its own GiB on the same machine;
overwriting a GiB the cache already held took 0.14 s. That write is in the downtime, so preflight
(check_migration, before anything is frozen) makes a file the size of the container's memory and
reads it once: the kernel fills its cache with zero pages, clean and so reclaimable should memory
run short. The restore's first page file takes the file over, and during the downtime the pages
are only copied.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time

import structlog

log = structlog.get_logger("stasis.agent")
MIN_SIZE = 16 << 20        # smaller containers' pages are written fast enough as they are
MAX_SHARE = 0.5            # of the memory available now: a pool never pushes the host into reclaim
TTL = 600.0                # seconds a pool waits for its restore (a migration that never came)
READ = 4 << 20             # bytes per read while the cache fills
BUDGET = 20.0              # seconds of preflight a pool may take; the pages beyond are allocated as written


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def warm(path: str, size: int, budget: float = BUDGET) -> None:
    """A file of `size` bytes whose pages are in the page cache, as many as `budget` seconds allow
    (blocking)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)   # blocks reserved, nothing written: reads give zero pages
        buf, deadline = bytearray(READ), time.monotonic() + budget
        while os.readv(fd, [buf]) > 0 and time.monotonic() < deadline:
            pass
    finally:
        os.close(fd)


class Pools:
    """Pool files made ready in preflight, each in a folder of its own under the landing (which an
    agent's start sweeps); a restore takes one."""

    def __init__(self) -> None:
        self._ready: list[tuple[str, float]] = []   # (pool file, when made)

    async def prepare(self, landing: str, size: int) -> str:
        """Make a pool of `size` bytes; returns its path, or "" when none is worth making or fits."""
        self.expire()
        if not landing or size < MIN_SIZE:
            return ""
        if size > available_memory() * MAX_SHARE:
            log.info("no page pool: not enough memory available", bytes=size)
            return ""
        folder = tempfile.mkdtemp(prefix="pool-", dir=landing)
        path = os.path.join(folder, "pages")
        started = time.monotonic()
        try:
            await asyncio.to_thread(warm, path, size)
        except OSError as e:   # a full disk, no fallocate: the restore writes as it would without
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("no page pool", bytes=size, error=str(e))
            return ""
        self._ready.append((path, time.monotonic()))
        log.info("page pool ready", bytes=size, seconds=round(time.monotonic() - started, 3))
        return path

    def take(self) -> str:
        """The newest pool not yet taken, or "" (the caller drops it once the restore is over)."""
        self.expire()
        return self._ready.pop()[0] if self._ready else ""

    def expire(self, ttl: float = TTL) -> None:
        now = time.monotonic()
        for path, made in [p for p in self._ready if now - p[1] > ttl]:
            self._ready.remove((path, made))
            drop(path)


def drop(path: str) -> None:
    """Remove a pool's folder (what is left of it once a page file took the pool over)."""
    if path:
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
