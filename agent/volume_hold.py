"""Keep a named volume readable after podman unmounts it.

podman mounts a volume created with mount options (a tmpfs volume, a bind, NFS) when its container
starts and unmounts it in the clean-up after a checkpoint. A direct migration archives the volumes
while podman finishes, so that unmount can come mid-read: a tmpfs volume would arrive partly or
wholly empty. A read-only bind mount of each such volume, taken before the dump, keeps its contents
reachable (the bind holds the filesystem) until the archive has them.

Read-only because the bind lies under the dump's scratch folder, which is deleted afterwards: should
the release ever be skipped (the agent killed), a delete of that folder fails instead of emptying
the volume; the next agent releases what is left there before it serves (release_under).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from typing import Iterator

import structlog

from stasis.errors import RuntimeFailure

log = structlog.get_logger()

MS_RDONLY, MS_REMOUNT, MS_BIND = 0x1, 0x20, 0x1000
# A read-only remount must repeat the flags the kernel may lock on the source: statvfs's bit -> mount(2)'s.
KEPT_FLAGS = ((os.ST_NOSUID, 0x2), (os.ST_NODEV, 0x4), (os.ST_NOEXEC, 0x8), (os.ST_NOATIME, 0x400),
              (os.ST_NODIRATIME, 0x800), (os.ST_RELATIME, 0x200000))
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(source: str | None, target: str, flags: int) -> None:
    if _libc.mount(source.encode() if source else None, target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _release(target: str) -> bool:
    # Detached at once: nothing under the scratch folder reaches the volume from here on. The bind
    # stays in the peer group it was made in, so the release reaches every copy propagation made.
    if _libc.umount2(target.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        log.warning("could not release a volume held for the archive", path=target, error=os.strerror(err))
        return False
    return True


def mount_points() -> set[str]:
    """Where something is mounted in this mount namespace. A bind mount on the same filesystem
    (podman's `o=bind` volume) has the same device as its parent, so os.path.ismount misses it."""
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:   # octal escapes: a space is \040
                points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def release_under(folder: str) -> list[str]:
    """Release every hold a killed agent left below `folder` (deepest first); the ones released."""
    root = os.path.realpath(folder).rstrip("/") + "/"
    left = sorted((p for p in mount_points() if p.startswith(root)), key=len, reverse=True)
    return [p for p in left if _release(p)]


@contextlib.contextmanager
def held(volumes: dict[str, str], folder: str) -> Iterator[dict[str, str]]:
    """Yield `volumes` (name -> folder) with every mounted one replaced by a read-only bind of it
    under `folder`; the binds are released on exit. Fails, before anything is frozen, when a bind
    cannot be made: the archive would otherwise lose the volume's contents without a word."""
    paths = dict(volumes)
    taken: list[str] = []
    mounted = mount_points() if volumes else set()
    try:
        for name, source in volumes.items():
            if os.path.realpath(source) not in mounted:
                continue   # a plain folder podman does not unmount
            target = os.path.join(folder, name)
            try:
                os.makedirs(target, exist_ok=True)
                _mount(source, target, MS_BIND)
                taken.append(target)
                flags = os.statvfs(target).f_flag
                kept = sum(ms for st, ms in KEPT_FLAGS if flags & st)
                _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY | kept)
            except OSError as exc:
                raise RuntimeFailure(f"could not hold volume {name} open for the migration archive "
                                     f"({exc.strerror}: {exc.filename}); nothing was frozen. The agent "
                                     f"needs root and a writable work folder") from None
            paths[name] = target
            log.info("volume held for the archive through podman's unmount", volume=name)
        yield paths
    finally:
        for target in taken:
            _release(target)
