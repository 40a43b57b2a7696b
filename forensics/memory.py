"""A dumped process's memory: CRIU's pagemap-N.img runs of pages, laid onto mm-N.img's mappings.

pagemap-N.img lists runs of pages (vaddr, count, flags); the runs flagged PE_PRESENT are stored one
after the other in pages-M.img (M is the pagemap head's pages_id), in pagemap order. Pages CRIU did
not write there (never touched, kept in a parent checkpoint, or left behind for lazy restore) are
absent: read() gives zeros for them and holes() names them. The pages file is read with seeks, a
chunk at a time, so a multi-GiB image never sits in memory.
"""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from stasis.errors import InvalidArgument
from stasis.forensics.images import ImageError, read_image

PAGE_SIZE = 4096          # x86_64, the only architecture stasis checkpoints
PE_PARENT, PE_LAZY, PE_PRESENT = 1 << 0, 1 << 1, 1 << 2

# vma_entry.status bits (CRIU's criu/include/image.h), those worth naming.
VMA_AREA_STACK, VMA_AREA_VSYSCALL, VMA_AREA_VDSO, VMA_AREA_HEAP = 1 << 1, 1 << 2, 1 << 3, 1 << 5
VMA_FILE_PRIVATE, VMA_FILE_SHARED, VMA_ANON_SHARED = 1 << 6, 1 << 7, 1 << 8
VMA_AREA_SYSVIPC, VMA_AREA_VVAR, VMA_AREA_MEMFD = 1 << 10, 1 << 12, 1 << 14
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_GROWSDOWN = 0x01, 0x100

MAX_READ = 64 << 20       # read() returns bytes in memory: callers page through larger spans
_ADDR_LIMIT = 1 << 64


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    prot: int
    flags: int
    status: int
    pgoff: int
    path: str | None = None   # the mapped file, for file mappings whose file the checkpoint names

    @property
    def perms(self) -> str:
        """As /proc/PID/maps prints them: 'r-xp'."""
        return "".join((
            "r" if self.prot & PROT_READ else "-", "w" if self.prot & PROT_WRITE else "-",
            "x" if self.prot & PROT_EXEC else "-", "s" if self.flags & MAP_SHARED else "p"))

    @property
    def label(self) -> str:
        if self.path:
            return self.path
        if self.flags & MAP_GROWSDOWN:
            return "[stack]"
        for bit, name in ((VMA_AREA_HEAP, "[heap]"), (VMA_AREA_STACK, "[stack]"), (VMA_AREA_VDSO, "[vdso]"),
                          (VMA_AREA_VVAR, "[vvar]"), (VMA_AREA_VSYSCALL, "[vsyscall]"),
                          (VMA_AREA_SYSVIPC, "[sysv-shm]"), (VMA_AREA_MEMFD, "[memfd]"),
                          (VMA_ANON_SHARED, "[shared-anon]")):
            if self.status & bit:
                return name
        return "[anon]"


@dataclass(frozen=True)
class Range:
    """Dumped bytes [start, end) of the address space, at `offset` in the pages image."""
    start: int
    end: int
    offset: int
    vma: Vma | None    # None: CRIU dumped pages outside every mapping mm-N.img lists (corrupt input)


@dataclass(frozen=True)
class Hit:
    vaddr: int
    vma: Vma | None
    offset: int        # where the match starts in the pages image
    match: bytes


class ProcessMemory:
    """The dumped memory of one process. Use as a context manager, or close() it."""

    def __init__(self, pages: BinaryIO, pages_name: str, runs: list[tuple[int, int, int]], vmas: list[Vma],
                 pid: int = 0):
        self.pid = pid
        self._pages, self._pages_name = pages, pages_name
        self._runs = runs                       # (start, end, offset), sorted, disjoint
        self._starts = [r[0] for r in runs]
        self.vmas = vmas                        # sorted, disjoint
        self._vma_ends = [v.end for v in vmas]

    @classmethod
    def open(cls, images, pid: int) -> "ProcessMemory":
        """Process `pid` of a CRIU image folder: a path, or any source of images with read(name),
        open(name) and size(name) (forensics.archive: an archive read in place, a folder)."""
        if isinstance(images, (str, os.PathLike)):
            from stasis.forensics.archive import Folder

            images = Folder(os.fspath(images))
        mm_img = _image(images, f"mm-{pid}.img", "mm")
        if len(mm_img.entries) != 1:
            raise ImageError(f"{mm_img.name} is corrupt: {len(mm_img.entries)} entries, expected 1")
        pagemap = _image(images, f"pagemap-{pid}.img", "pagemap")
        vmas = _vmas(mm_img.name, mm_img.entries[0].vmas, _file_paths(images))
        runs = _runs(pagemap.name, pagemap.entries)
        stored = max((offset + end - start for start, end, offset in runs), default=0)
        pages_name = f"pages-{pagemap.head.pages_id}.img"
        try:
            pages = images.open(pages_name)
        except OSError as e:
            raise ImageError(f"{pages_name} (named by {pagemap.name}) cannot be read: {e.strerror or e}") from None
        if pages is None:
            raise ImageError(f"{pages_name} (named by {pagemap.name}) is missing")
        size = images.size(pages_name) or 0
        if size < stored:
            pages.close()
            raise ImageError(f"{pages_name} is truncated: {pagemap.name} needs {stored} bytes, it holds {size}")
        return cls(pages, pages_name, runs, vmas, pid)

    def close(self) -> None:
        self._pages.close()

    def __enter__(self) -> "ProcessMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def vma_at(self, vaddr: int) -> Vma | None:
        i = bisect.bisect_right(self._vma_ends, vaddr)
        return self.vmas[i] if i < len(self.vmas) and self.vmas[i].start <= vaddr else None

    def ranges(self) -> Iterator[Range]:
        """Every dumped span, in address order, cut where mappings begin and end."""
        for start, end, offset in self._runs:
            pos = start
            j = bisect.bisect_right(self._vma_ends, pos)     # the first mapping ending after pos
            while pos < end:
                if j < len(self.vmas) and self.vmas[j].start <= pos:
                    vma, stop = self.vmas[j], min(end, self.vmas[j].end)
                    j += 1
                else:
                    vma, stop = None, min(end, self.vmas[j].start) if j < len(self.vmas) else end
                yield Range(pos, stop, offset + pos - start, vma)
                pos = stop

    def read(self, vaddr: int, length: int) -> bytes:
        """`length` bytes from `vaddr`; absent pages read as zeros (see holes())."""
        _check_span(vaddr, length)
        out = bytearray(length)
        for start, end, src in self._overlapping(vaddr, vaddr + length):
            out[start - vaddr:end - vaddr] = self._read_pages(src, end - start)
        return bytes(out)

    def holes(self, vaddr: int, length: int) -> list[tuple[int, int]]:
        """The [start, end) spans of [vaddr, vaddr+length) whose bytes the checkpoint lacks."""
        _check_span(vaddr, length, limit=_ADDR_LIMIT)
        out, pos = [], vaddr
        for start, end, _ in self._overlapping(vaddr, vaddr + length):
            if start > pos:
                out.append((pos, start))
            pos = end
        if pos < vaddr + length:
            out.append((pos, vaddr + length))
        return out

    def search(self, pattern: bytes | re.Pattern[bytes], max_match: int = 4096,
               chunk: int = 1 << 20) -> Iterator[Hit]:
        """Occurrences of `pattern` (bytes, or a compiled bytes regex) in the dumped memory.

        Memory is scanned a chunk at a time; a regex match longer than `max_match` bytes may be cut
        short or missed where it crosses a chunk boundary. Matches may span adjacent page runs,
        never a hole.
        """
        if isinstance(pattern, re.Pattern):
            regex, longest = pattern, max_match
        else:
            regex, longest = re.compile(re.escape(bytes(pattern))), len(pattern)
        if not 1 <= longest <= MAX_READ // 2 or chunk < 1:
            raise InvalidArgument(f"search needs a pattern of 1 to {MAX_READ // 2} bytes and a positive chunk size")
        keep = longest - 1
        chunk = min(chunk, MAX_READ - keep)
        for seg_start, seg_end in self._segments():
            pos, last_end = seg_start, seg_start
            while pos < seg_end:
                stop = min(seg_end, pos + chunk + keep)
                buf = self.read(pos, stop - pos)
                report_until = seg_end if stop == seg_end else stop - keep
                # Resume after the last hit: a match never overlaps the one before it.
                for m in regex.finditer(buf, max(0, last_end - pos)):
                    at = pos + m.start()
                    if at >= report_until:
                        break
                    if m.end() == m.start():
                        continue
                    last_end = pos + m.end()
                    yield Hit(at, self.vma_at(at), self._offset_of(at), m.group())
                if stop == seg_end:
                    break
                pos = report_until

    def _segments(self) -> Iterator[tuple[int, int]]:
        """Dumped runs merged where they touch: matches may cross a run boundary."""
        cur = None
        for start, end, _ in self._runs:
            if cur and cur[1] == start:
                cur[1] = end
            else:
                if cur:
                    yield tuple(cur)
                cur = [start, end]
        if cur:
            yield tuple(cur)

    def _overlapping(self, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
        """(start, end, pages offset) of the dumped parts of [lo, hi)."""
        i = max(bisect.bisect_right(self._starts, lo) - 1, 0)
        for start, end, offset in self._runs[i:]:
            if start >= hi:
                break
            if end > lo:
                a, b = max(start, lo), min(end, hi)
                yield a, b, offset + a - start

    def _offset_of(self, vaddr: int) -> int:
        start, _, offset = self._runs[bisect.bisect_right(self._starts, vaddr) - 1]
        return offset + vaddr - start

    def _read_pages(self, offset: int, n: int) -> bytes:
        try:
            self._pages.seek(offset)
            data = self._pages.read(n)
        except OSError as e:
            raise ImageError(f"{self._pages_name} cannot be read: {e.strerror or e}") from None
        if len(data) < n:
            raise ImageError(f"{self._pages_name} is truncated at offset {offset + len(data)}")
        return data


def _check_span(vaddr: int, length: int, limit: int = MAX_READ) -> None:
    if vaddr < 0 or length < 0 or vaddr + length > _ADDR_LIMIT:
        raise InvalidArgument(f"address range {vaddr:#x}+{length} is outside a 64-bit address space")
    if length > limit:
        raise InvalidArgument(f"cannot read {length} bytes at once (limit {limit})")


def _runs(name: str, entries: list) -> list[tuple[int, int, int]]:
    """(start, end, offset in pages image) of every stored run, sorted; refuses overlaps."""
    runs, offset = [], 0
    for i, e in enumerate(entries, start=2):      # entry 1 is the head
        # Images older than CRIU 3.x have no flags: in_parent alone said where the pages were.
        flags = e.flags if e.HasField("flags") else (PE_PARENT if e.in_parent else PE_PRESENT)
        size = e.nr_pages * PAGE_SIZE
        if e.vaddr % PAGE_SIZE or e.vaddr + size > _ADDR_LIMIT:
            raise ImageError(f"{name} is corrupt: entry {i} maps {e.nr_pages} pages at {e.vaddr:#x}")
        if flags & PE_PRESENT and size:
            runs.append((e.vaddr, e.vaddr + size, offset))
            offset += size
    runs.sort()
    for (_, prev_end, _), (start, _, _) in zip(runs, runs[1:], strict=False):
        if start < prev_end:
            raise ImageError(f"{name} is corrupt: pages at {start:#x} are stored twice")
    return runs


def _vmas(name: str, entries, paths: dict[int, str]) -> list[Vma]:
    vmas = sorted((Vma(v.start, v.end, v.prot, v.flags, v.status, v.pgoff,
                       paths.get(v.shmid) if v.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED) else None)
                   for v in entries), key=lambda v: v.start)
    for v in vmas:
        if v.start >= v.end or v.end > _ADDR_LIMIT:
            raise ImageError(f"{name} is corrupt: a mapping spans {v.start:#x}-{v.end:#x}")
    for prev, v in zip(vmas, vmas[1:], strict=False):
        if v.start < prev.end:
            raise ImageError(f"{name} is corrupt: mappings at {prev.start:#x} and {v.start:#x} overlap")
    return vmas


def _image(images, name: str, expect: str):
    try:
        data = images.read(name)
    except OSError as e:
        raise ImageError(f"{name} cannot be read: {e.strerror or e}") from None
    if data is None:
        raise ImageError(f"{name} is missing")
    return read_image(data, name, expect)


def _file_paths(images) -> dict[int, str]:
    """File id → path of regular files: files.img (CRIU 4.x) or reg-files.img (older)."""
    paths: dict[int, str] = {}
    for name, kind in (("reg-files.img", "reg-files"), ("files.img", "files")):
        if images.size(name) is None:
            continue
        for e in _image(images, name, kind).entries:
            if kind == "reg-files":
                paths[e.id] = e.name
            elif e.HasField("reg"):
                paths[e.id] = e.reg.name
    return paths
