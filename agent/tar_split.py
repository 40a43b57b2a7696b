"""Split CRIU's memory pages out of a checkpoint archive while it streams in.

A migration's archive is mostly `checkpoint/pages-N.img`. podman's import unpacks all of it with
one thread before CRIU starts, a second full copy on the destination's disk. Written straight into
a folder of their own as they arrive, the pages are placed into CRIU's image folder at restore (the
runc wrapper links them), and podman unpacks only the small rest.

The stream comes from an authenticated peer, but it is parsed defensively all the same: bounded
extended headers, names checked, and any header this does not understand makes the member stay in
the archive (which the tar extractor then validates as usual). Nothing here is used before the
transfer's seal has been verified.

A page file may come in parts, `checkpoint/pages-N.img.part-OFFSET` (the source sends memory while
CRIU still writes it: podman_archive.PagesFollower); they are joined here, and must arrive in order.
Where the pages cannot be placed for CRIU, join_pages() puts them back into the archive whole.
"""

from __future__ import annotations

import os
import re
import tarfile

BLOCK = 512
PAGE_FILE = re.compile(r"^pages-[0-9]{1,9}\.img$")   # CRIU's name for a file of memory pages
PAGES = re.compile(r"^(?:\./)?checkpoint/(pages-[0-9]{1,9}\.img)(?:\.part-([0-9]{1,15}))?$")
EXTENDED = (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)   # they describe the next member
MAX_EXTENDED = 1 << 20   # bytes of one extended header: names and a few numbers, never more


class SplitError(Exception):
    pass


def part_name(arcname: str, start: int) -> str:
    """The member holding a page file's bytes from `start` on."""
    return f"{arcname}.part-{start}"


class PagesSplitter:
    """feed() the archive's bytes in order; members named checkpoint/pages-N.img (or its parts,
    joined) go to `pages_dir`/pages-N.img, everything else (headers included) to the file `fd`, so that it is
    again a well-formed archive without them."""

    def __init__(self, fd: int, pages_dir: str, whole: bool = True, pool: str = ""):
        """`whole`: a page file that comes as one member goes aside too (else only parts do).
        `pool`: a file in `pages_dir`'s filesystem whose pages the kernel holds already (pool.py);
        the first page file takes it over, so that writing it copies memory instead of allocating it."""
        self.fd = fd
        self.pool = pool
        self._pooled = ""
        self.whole = whole
        self.pages_dir = pages_dir
        self.pages: dict[str, int] = {}   # page file -> bytes written so far, in order of arrival
        self.end_at = -1                   # where the end-of-archive block begins in `fd`
        self._kept: set[str] = set()       # page files left whole in the archive (not `whole`)
        self._header = b""             # a header block still being assembled
        self._held: list[bytes] = []   # extended headers and their data, written with their member
        self._override: dict[str, str] = {}   # what they say of the next member
        self._extended = bytearray()   # the data of the extended header being read
        self._extended_type = b""
        self._left = 0                 # data bytes of the current member still to come
        self._pad = 0                  # then padding up to the next block
        self._into = "archive"         # where they go: "archive", "aside" (a page file) or "extended"
        self._aside: int | None = None
        self._ended = False            # the end-of-archive block came: the rest goes as it is

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._ended:
                write_all(self.fd, view)
                return
            if self._left or self._pad:
                view = self._data(view)
                continue
            need = BLOCK - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == BLOCK:
                block, self._header = self._header, b""
                self._begin(block)

    def close(self) -> list[str]:
        """The names of the pages written aside; raises if the archive stopped mid-member."""
        self._close_aside()
        if self._left or self._pad or self._header or self._held:
            raise SplitError("the archive ended in the middle of a member")
        if self._pooled:   # the pool was sized from the container's memory, not from this file
            os.truncate(os.path.join(self.pages_dir, self._pooled), self.pages[self._pooled])
        return list(self.pages)

    def _begin(self, block: bytes) -> None:
        if block == bytes(BLOCK):   # end of archive
            self._flush_held()
            self.end_at = os.lseek(self.fd, 0, os.SEEK_CUR)
            write_all(self.fd, block)
            self._ended = True
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as e:
            raise SplitError(f"a malformed tar header ({e})") from None
        if info.type in EXTENDED:
            if info.size > MAX_EXTENDED:
                raise SplitError(f"an extended tar header of {info.size} bytes")
            self._held.append(block)
            self._into, self._extended_type, size = "extended", info.type, info.size
        else:
            name, size, plain = self._apply_overrides(info)
            match = PAGES.match(name) if plain and info.type in (tarfile.REGTYPE, tarfile.AREGTYPE) else None
            if match and (self.whole or match.group(2) is not None or match.group(1) in self.pages):
                page, start = match.group(1), int(match.group(2) or 0)
                if (self.pages.get(page, 0) != start or (page in self.pages and match.group(2) is None)
                        or page in self._kept):
                    raise SplitError(f"{name} does not continue {page} (it holds {self.pages.get(page, 0)} bytes)")
                self._held.clear()   # they described this member only
                path = os.path.join(self.pages_dir, page)
                fresh = page not in self.pages
                if fresh and self.pool and not os.path.lexists(path):
                    os.rename(self.pool, path)
                    self.pool, self._pooled, fresh = "", page, False
                self._aside = os.open(path, os.O_WRONLY | (os.O_CREAT | os.O_EXCL if fresh else 0), 0o600)
                os.lseek(self._aside, start, os.SEEK_SET)   # parts come in order (checked above)
                self.pages[page] = start + size
                self._into = "aside"
            else:
                if match:
                    self._kept.add(match.group(1))
                self._flush_held()
                write_all(self.fd, block)
                self._into = "archive"
        self._left, self._pad = size, -size % BLOCK
        self._member_done()

    def _data(self, view: memoryview) -> memoryview:
        if self._left:
            piece, view = view[:self._left], view[self._left:]
            self._left -= len(piece)
            self._put(piece, padding=False)
        if not self._left and self._pad and view:
            pad, view = view[:self._pad], view[self._pad:]
            self._pad -= len(pad)
            self._put(pad, padding=True)
        self._member_done()
        return view

    def _put(self, piece: memoryview, padding: bool) -> None:
        if self._into == "extended":
            if not padding:
                self._extended += piece
            self._held.append(bytes(piece))
        elif self._into == "aside":
            if not padding:   # a page file's padding goes with it
                write_all(self._aside, piece)
        else:
            write_all(self.fd, piece)

    def _member_done(self) -> None:
        if self._left or self._pad:
            return
        if self._into == "extended":
            raw = bytes(self._extended)
            self._extended.clear()
            if self._extended_type == tarfile.GNUTYPE_LONGNAME:
                self._override["path"] = raw.rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif self._extended_type == tarfile.XHDTYPE:
                self._override.update(_pax_records(raw))
        self._close_aside()
        self._into = "archive"

    def _close_aside(self) -> None:
        if self._aside is not None:
            os.close(self._aside)
            self._aside = None

    def _apply_overrides(self, info: tarfile.TarInfo) -> tuple[str, int, bool]:
        """(name, data size, whether the data is the file's bytes as they are: not sparse)"""
        name, size = info.name, info.size
        over, self._override = self._override, {}
        if "path" in over:
            name = over["path"]
        if "size" in over:
            try:
                size = int(over["size"])
            except ValueError:
                raise SplitError("an extended tar header with a malformed size") from None
            if size < 0:
                raise SplitError("an extended tar header with a negative size")
        return name, size, not any(key.startswith("GNU.sparse") for key in over)

    def _flush_held(self) -> None:
        for piece in self._held:
            write_all(self.fd, piece)
        self._held.clear()


def join_pages(fd: int, end_at: int, pages_dir: str, names: list[str]) -> None:
    """Put page files split out of the archive in `fd` back into it, whole, before its end (for a
    runtime that unpacks everything itself)."""
    if end_at < 0:
        raise SplitError("the archive has no end")
    os.ftruncate(fd, end_at)
    os.lseek(fd, end_at, os.SEEK_SET)
    for name in names:
        with open(os.path.join(pages_dir, name), "rb") as src:
            info = tarfile.TarInfo(f"checkpoint/{name}")
            info.size, info.mode = os.fstat(src.fileno()).st_size, 0o600
            write_all(fd, info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            copy_data(fd, src, 0, info.size)
    write_all(fd, bytes(2 * BLOCK))


def copy_data(fd: int, src, start: int, size: int) -> None:
    """A member's data, `size` bytes of `src` from `start`, and its padding; copied by the kernel."""
    left, offset = size, start
    while left:
        copied = os.copy_file_range(src.fileno(), fd, min(left, 1 << 30), offset)
        if copied == 0:
            raise OSError(f"{src.name} shrank while it was archived")
        left, offset = left - copied, offset + copied
    write_all(fd, bytes(-size % BLOCK))


def write_all(fd: int, data) -> None:
    """All of it: a short write (a full disk) must not lose the rest silently."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _pax_records(raw: bytes) -> dict[str, str]:
    """The records of a pax extended header ("LEN key=value\\n" each), decoded; SplitError if malformed."""
    out, pos = {}, 0
    while pos < len(raw):
        space = raw.find(b" ", pos)
        try:
            length = int(raw[pos:space])
        except ValueError:
            raise SplitError("a malformed pax record") from None
        record = raw[space + 1:pos + length]
        if length <= 0 or pos + length > len(raw) or not record.endswith(b"\n") or b"=" not in record:
            raise SplitError("a malformed pax record")
        key, _, value = record[:-1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out
