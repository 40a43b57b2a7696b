"""Podman's checkpoint archive, written by us from the container's state.

A post-copy dump never returns to podman before the destination has taken every page, so podman's
own `--export` comes too late; and in a stop-and-copy migration podman's single-threaded export of
the pages would compete with the transfer for this host's cores. The layout that `podman container
restore --import` reads is rebuilt here from what podman and CRIU have already written: CRIU's
images, config.dump and spec.dump (in the container's state folder), the root filesystem's changes
(its overlay upper folder), /dev/shm and named volumes. The container is frozen (post-copy) or
stopped (stop-and-copy) meanwhile, so none of it changes under us.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import stat
import tarfile
import tempfile
import threading

from stasis.agent import spliced_archive
from stasis.agent.tar_split import BLOCK, PAGE_FILE, copy_data, part_name, write_all

# Files podman manages itself in every container (bind mounts, recreated at restore): its own
# export leaves them out of the root filesystem's changes as well.
MANAGED = {"etc/hosts", "etc/hostname", "etc/resolv.conf", "etc/mtab", "run/.containerenv"}
DEVSHM = "devshm-checkpoint.tar"   # /dev/shm's contents, in the archive and as podman leaves it
PART = 4 << 20   # bytes a page file grows by while CRIU writes it before they go into the archive
FOLLOW_POLL = 0.005   # seconds between looks at the page files CRIU is writing


def rootfs_changes(upper: str) -> tuple[list[str], list[str]]:
    """(added or changed paths, deleted paths) of an overlay upper folder, relative to the root."""
    changed, deleted = [], []
    for folder, dirs, files in os.walk(upper):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, upper)
            st = os.lstat(path)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:   # an overlay whiteout: deleted below
                deleted.append("/" + rel)
            elif rel not in MANAGED:
                changed.append(rel)
    return changed, deleted


def _tree(folder: str) -> list[tuple[str, str, bool]]:
    """A folder's contents (how podman ships /dev/shm and each volume)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(os.path.join(folder, n), n, True) for n in names]


def read_dumps(static_dir: str) -> dict[str, bytes]:
    """config.dump, spec.dump (podman writes them before CRIU runs) and stats-dump (CRIU's, at its
    end): podman deletes all three once its own export is done, so they are taken early."""
    out = {}
    for name in ("config.dump", "spec.dump", "stats-dump"):
        try:
            with open(os.path.join(static_dir, name), "rb") as f:
                out[name] = f.read()
        except FileNotFoundError:
            if name != "stats-dump":
                raise
    return out


class ArchiveWriter:
    """The outer archive, written member by member. Files are copied by the kernel
    (copy_file_range: no trip through this process for a GiB of pages), small members are built
    by tarfile. Usable in steps from worker threads, one step at a time."""

    def __init__(self, path: str, references: bool = False):
        """`references`: the pages' data stay in their files, named in PATH.refs (spliced_archive)."""
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self.refs_fd = os.open(spliced_archive.refs_path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                               0o600) if references else -1

    def _small(self, build) -> None:
        """Members tarfile writes (folders, small files, bytes), without its end-of-archive blocks."""
        buf = io.BytesIO()
        tar = tarfile.open(fileobj=buf, mode="w")
        build(tar)
        end = tar.offset
        tar.close()
        write_all(self.fd, buf.getbuffer()[:end])

    def add_bytes(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o600
        self._small(lambda tar: tar.addfile(info, io.BytesIO(data)))

    def add_file(self, path: str, arcname: str, by_reference: bool = False) -> None:
        with open(path, "rb") as src:
            st = os.fstat(src.fileno())
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = st.st_size, stat.S_IMODE(st.st_mode), int(st.st_mtime)
            info.uid, info.gid = st.st_uid, st.st_gid
            self._member(info, src, 0, by_reference)

    def add_range(self, path: str, arcname: str, start: int, size: int) -> None:
        """`size` bytes of a file from `start`, as a member of their own (by reference if it can)."""
        with open(path, "rb") as src:
            info = tarfile.TarInfo(arcname)
            info.size, info.mode, info.mtime = size, 0o600, int(os.fstat(src.fileno()).st_mtime)
            self._member(info, src, start, True)

    def _member(self, info: tarfile.TarInfo, src, start: int, by_reference: bool) -> None:
        write_all(self.fd, info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if by_reference and self.refs_fd >= 0:
            at = os.lseek(self.fd, 0, os.SEEK_CUR)
            spliced_archive.add_reference(self.refs_fd, at, os.path.abspath(src.name), info.size, start)
            return
        copy_data(self.fd, src, start, info.size)

    def add_images(self, folder: str, arcname: str = "checkpoint", pages: bool = True) -> None:
        """CRIU's image folder: the folder itself, then its files (regular ones by the kernel);
        without its pages-*.img if `pages` is false (a PagesFollower adds them)."""
        names = sorted(n for n in os.listdir(folder) if pages or not PAGE_FILE.match(n))
        regular = [n for n in names if stat.S_ISREG(os.lstat(os.path.join(folder, n)).st_mode)]
        other = [n for n in names if n not in regular]

        def build(tar: tarfile.TarFile) -> None:
            tar.add(folder, arcname=arcname, recursive=False)
            for name in other:
                tar.add(os.path.join(folder, name), arcname=f"{arcname}/{name}")
        self._small(build)
        for name in regular:
            self.add_file(os.path.join(folder, name), f"{arcname}/{name}")

    def add_pages(self, folder: str, arcname: str = "checkpoint") -> None:
        """pages-*.img set aside from CRIU's image folder, back into it in the archive."""
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if PAGE_FILE.match(name):
                self.add_file(os.path.join(folder, name), f"{arcname}/{name}", by_reference=True)

    def add_nested(self, name: str, members: list[tuple[str, str, bool]]) -> None:
        """A tar inside the archive, of (path, name inside, recursive) members; staged in a temporary
        file beside the archive, since a volume may be large."""
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(self.path) or ".") as staged:
            with tarfile.open(fileobj=staged, mode="w") as inner:
                for path, arcname, recursive in members:
                    inner.add(path, arcname=arcname, recursive=recursive)
            staged.flush()
            self.add_file(staged.name, name)

    def add_state(self, static_dir: str, upper: str, volumes: dict[str, str], dumps: dict[str, bytes],
                  shm_tar: str | None) -> None:
        """Everything but CRIU's images: podman's dumps and records, /dev/shm, the root filesystem's
        changes and named volumes."""
        for name, data in dumps.items():
            self.add_bytes(name, data)
        # podman's record of the container's network (written when it started); "null" without one.
        try:
            with open(os.path.join(static_dir, "network.status"), "rb") as f:
                status = f.read(1 << 20)
        except FileNotFoundError:
            status = b"null"
        self.add_bytes("network.status", status)
        if shm_tar:
            self.add_file(shm_tar, DEVSHM)
        else:
            self.add_nested(DEVSHM, _tree(os.path.join(static_dir, "shm")))
        changed, deleted = rootfs_changes(upper)
        self.add_nested("rootfs-diff.tar", [(os.path.join(upper, rel), rel, False) for rel in changed])
        if deleted:
            self.add_bytes("deleted.files", json.dumps(deleted).encode())
        for name, folder in sorted(volumes.items()):
            self.add_nested(f"volumes/{name}.tar", _tree(folder))

    def close(self) -> None:
        if self.fd >= 0:
            write_all(self.fd, bytes(2 * BLOCK))   # end of archive
        self.abandon()

    def abandon(self) -> None:
        for fd in (self.fd, self.refs_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.refs_fd = -1


class PagesFollower:
    """CRIU's page files put into the archive while CRIU is still writing them, so that a peer
    fetching the archive receives memory during the dump, not after it.

    CRIU only ever appends to a pages-N.img. Each time one has grown by PART, the new bytes become a
    member of their own, `checkpoint/pages-N.img.part-OFFSET` (by reference: nothing is copied);
    `finish()`, once CRIU is done, adds the rest. The receiving agent joins the parts again
    (tar_split). A hard link in `links` keeps each file's path while the runc wrapper moves the
    original aside (it must be on the same filesystem as `images`).
    """

    def __init__(self, writer: ArchiveWriter, images: str, links: str):
        self.writer, self.images, self.links = writer, images, links
        self.sent: dict[str, int] = {}   # page file -> bytes of it in the archive so far

    def follow(self, stop: threading.Event) -> None:
        """Poll until `stop` is set (from another thread); the writer is this thread's meanwhile."""
        while not stop.wait(FOLLOW_POLL):
            self.poll()

    def poll(self) -> None:
        try:
            entries = [e for e in os.scandir(self.images) if PAGE_FILE.match(e.name)]
        except FileNotFoundError:   # CRIU has not made its folder yet
            entries = []
        for entry in entries:
            if entry.name not in self.sent:
                os.makedirs(self.links, mode=0o700, exist_ok=True)
                try:
                    os.link(entry.path, os.path.join(self.links, entry.name))
                except FileNotFoundError:   # moved aside already: finish() takes it whole
                    continue
                self.sent[entry.name] = 0
        for name, sent in self.sent.items():
            link = os.path.join(self.links, name)
            grown = os.stat(link).st_size - sent
            if grown >= PART:
                grown -= grown % PART
                self.writer.add_range(link, part_name(f"checkpoint/{name}", sent), sent, grown)
                start_writeback(link, sent, grown)
                self.sent[name] = sent + grown

    def finish(self, *folders: str) -> None:
        """The page files' remaining bytes, once CRIU is done, wherever they are now (`folders`):
        a file this never saw goes whole, under its own name."""
        where = {}
        for folder in folders:
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                if PAGE_FILE.match(name):
                    where.setdefault(name, os.path.join(folder, name))
        for name in sorted(set(where) | set(self.sent)):
            sent = self.sent.get(name, 0)
            path = os.path.join(self.links, name) if name in self.sent else where[name]
            size = os.stat(path).st_size
            if not sent:
                self.writer.add_file(path, f"checkpoint/{name}", by_reference=True)
            elif size > sent:
                self.writer.add_range(path, part_name(f"checkpoint/{name}", sent), sent, size - sent)
            self.sent[name] = size


_LIBC = ctypes.CDLL(None, use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(path: str, start: int, size: int) -> None:
    """Start writing a range of a page file to disk, without waiting. podman's clean-up at the end of
    the dump unmounts the container's overlay, which syncs the whole filesystem: pages already on
    disk by then are pages that sync does not wait for (nor anything else on this disk meanwhile,
    such as a restore's fsync). Best effort: the pages are written at that sync anyway."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        _LIBC.sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(size), ctypes.c_uint(SYNC_FILE_RANGE_WRITE))
    finally:
        os.close(fd)


def write(archive: str, static_dir: str, upper: str, volumes: dict[str, str],
          dumps: dict[str, bytes] | None = None, shm_tar: str | None = None) -> None:
    """Write the import archive in one go; `volumes` maps a named volume to its folder ({} leaves
    them out); `dumps`: read_dumps() taken earlier (default: read now); `shm_tar`: /dev/shm as podman
    tarred it (default: tar the mounted folder, which a frozen container still has)."""
    dumps = dumps if dumps is not None else read_dumps(static_dir)
    writer = ArchiveWriter(archive)
    try:
        writer.add_images(os.path.join(static_dir, "checkpoint"))
        writer.add_state(static_dir, upper, volumes, dumps, shm_tar)
        writer.close()
    finally:
        writer.abandon()
