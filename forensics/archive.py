"""A podman checkpoint archive read in place, and the checks that make that safe.

The archive (podman's export tar) is hostile input. Every member header is checked before any of
it is used: an absolute name, a `..` component, a link, a device or fifo, a sparse member, or a
member or total size over the limits refuses the whole archive with one ArchiveError line.

Nothing is unpacked. ArchiveIndex walks the tar's headers through a positional read (a local file,
or storage.artifact_file.ArtifactFile over the repository, which then fetches only the chunks
holding those headers) and remembers where each wanted member's bytes lie: checkpoint/NAME.img,
stats-dump, config.dump, spec.dump, deleted.files and rootfs-diff.tar. A question about the
checkpoint then reads just the members, or the parts of a member, it needs.
"""

from __future__ import annotations

import contextlib
import os
import re
import tarfile
import zlib
from typing import Callable

from stasis.errors import IntegrityError
from stasis.storage.artifact_file import Window

IMG_NAME = re.compile(r"checkpoint/([A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.img)")
TOP_FILES = ("stats-dump", "config.dump", "spec.dump", "deleted.files", "rootfs-diff.tar")
SMALL_FILES = {"config.dump": 16 << 20, "spec.dump": 16 << 20, "deleted.files": 16 << 20, "stats-dump": 1 << 20}
MAX_MEMBER = 64 << 30          # one file of the archive (pages of a big process)
MAX_TOTAL = 256 << 30          # everything the archive holds
MAX_MEMBERS = 200_000          # tar headers read
MAX_SMALL = 256 << 20          # a member read whole into memory (CRIU images other than pages)

Pread = Callable[[int, int], bytes]


class ArchiveError(IntegrityError):
    """A checkpoint archive is malformed or hostile; nothing of it was used."""


def check_member(member: tarfile.TarInfo) -> str | None:
    """Where a member goes (a relative name this module chose), None to skip it; ArchiveError if hostile."""
    name = checked_name(member)
    if name is None:
        return None
    if (m := IMG_NAME.fullmatch(name)) is not None:
        return f"checkpoint/{m.group(1)}"
    if name in TOP_FILES:
        if member.size > SMALL_FILES.get(name, MAX_MEMBER):
            raise ArchiveError(f"the checkpoint archive's {name} is {member.size} bytes "
                               f"(limit {SMALL_FILES[name]})")
        return name
    return None


def checked_name(member: tarfile.TarInfo) -> str | None:
    """A member's normalised relative name once its shape is safe (no absolute name, no '..', no link,
    no device, within the size limit); None for a folder. ArchiveError if hostile."""
    raw = member.name
    shown = repr(raw[:120])
    if not raw or "\0" in raw or "\\" in raw:
        raise ArchiveError(f"the checkpoint archive has a member with a malformed name {shown}")
    if raw.startswith("/"):
        raise ArchiveError(f"the checkpoint archive has an absolute member name {shown}: refusing it")
    parts = raw.split("/")
    if ".." in parts:
        raise ArchiveError(f"the checkpoint archive has a member {shown} that climbs out with '..': refusing it")
    if member.issym() or member.islnk():
        raise ArchiveError(f"the checkpoint archive has a link {shown} -> {member.linkname[:120]!r}: refusing it")
    if member.isdir():
        return None
    if member.issparse():
        raise ArchiveError(f"the checkpoint archive has a sparse member {shown}: podman never writes one")
    if not member.isfile():
        raise ArchiveError(f"the checkpoint archive has a device, fifo or special member {shown}: refusing it")
    if member.size < 0 or member.size > MAX_MEMBER:
        raise ArchiveError(f"the checkpoint archive's member {shown} is {member.size} bytes (limit {MAX_MEMBER})")
    return "/".join(p for p in parts if p not in ("", "."))


@contextlib.contextmanager
def open_archive(archive: str, doing: str):
    """The archive as a tar file; a failure to read it inside the block is one ArchiveError line."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            yield tar
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"the checkpoint archive is not a readable tar file ({_first_line(e)})") from None
    except OSError as e:
        raise ArchiveError(f"the checkpoint archive cannot be {doing}: {e.strerror or e}") from None


def members(tar: tarfile.TarFile):
    """Every member, counted against MAX_MEMBERS, read header by header (never all at once)."""
    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_MEMBERS:
            raise ArchiveError(f"the checkpoint archive has more than {MAX_MEMBERS} members")
        yield member


def add_to_total(total: int, member: tarfile.TarInfo) -> int:
    total += member.size
    if total > MAX_TOTAL:
        raise ArchiveError(f"the checkpoint archive holds more than {MAX_TOTAL} bytes of files")
    return total


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ArchiveIndex:
    """Where each wanted member of a checkpoint archive lies, from its headers alone."""

    def __init__(self, pread: Pread, size: int):
        self._pread, self.archive_size = pread, size
        self.members: dict[str, tuple[int, int]] = {}     # name this module chose -> (offset, size)
        total = 0
        try:
            with tarfile.open(fileobj=Window(pread, 0, size), mode="r:") as tar:
                for member in members(tar):
                    target = check_member(member)
                    if target is None:
                        continue
                    total = add_to_total(total, member)
                    if target in self.members:
                        raise ArchiveError(f"the checkpoint archive holds {member.name!r} twice")
                    if member.offset_data + member.size > size:
                        raise ArchiveError(f"the checkpoint archive is truncated inside {member.name!r}")
                    self.members[target] = (member.offset_data, member.size)
        except (tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"the checkpoint archive is not a readable tar file ({_first_line(e)})") from None
        except OSError as e:
            raise ArchiveError(f"the checkpoint archive cannot be read: {e.strerror or e}") from None
        if "checkpoint/pstree.img" not in self.members:
            raise ArchiveError("the archive is not a podman checkpoint: it has no checkpoint/pstree.img")

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n[len(prefix):] for n in self.members if n.startswith(prefix) and "/" not in n[len(prefix):])

    def size(self, name: str) -> int | None:
        where = self.members.get(name)
        return where[1] if where else None

    def open(self, name: str) -> Window | None:
        where = self.members.get(name)
        return Window(self._pread, where[0], where[1], name) if where else None

    def read(self, name: str, limit: int = MAX_SMALL) -> bytes | None:
        where = self.members.get(name)
        if where is None:
            return None
        if where[1] > limit:
            raise ArchiveError(f"the checkpoint archive's {name} is {where[1]} bytes, over the {limit} read whole")
        data = self._pread(*where)
        if len(data) != where[1]:
            raise ArchiveError(f"the checkpoint archive is truncated inside {name!r}")
        return data


class Folder:
    """The same questions asked of an unpacked checkpoint (a folder holding checkpoint/ and podman's files)."""

    def __init__(self, root: str):
        self.root = root
        self.archive_size = 0

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def names(self, prefix: str = "") -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._path(prefix)) if os.path.isfile(self._path(prefix + n)))
        except FileNotFoundError:
            return []

    def size(self, name: str) -> int | None:
        return os.path.getsize(self._path(name)) if os.path.isfile(self._path(name)) else None

    def open(self, name: str):
        try:
            return open(self._path(name), "rb")
        except FileNotFoundError:
            return None

    def read(self, name: str, limit: int = MAX_SMALL) -> bytes | None:
        size = self.size(name)
        if size is None:
            return None
        if size > limit:
            raise ArchiveError(f"the checkpoint's {name} is {size} bytes, over the {limit} read whole")
        with open(self._path(name), "rb") as f:
            return f.read()


class Prefixed:
    """The members of a source under one folder (checkpoint/), named without it."""

    def __init__(self, source, prefix: str):
        self.source, self.prefix = source, prefix

    def names(self, prefix: str = "") -> list[str]:
        return self.source.names(self.prefix + prefix)

    def size(self, name: str) -> int | None:
        return self.source.size(self.prefix + name)

    def open(self, name: str):
        return self.source.open(self.prefix + name)

    def read(self, name: str, limit: int = MAX_SMALL) -> bytes | None:
        return self.source.read(self.prefix + name, limit)
