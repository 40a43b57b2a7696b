"""An archive on disk whose biggest members' data stay in their own files.

A migration's archive is mostly CRIU's pages, already on disk. Copying them into the archive only
for the sender to read them back cost a second write of every page and, measured here, about a
CPU-second per GiB on a host whose cores the transfer needs. So the writer leaves a member's data
out of ARCHIVE and records where it belongs in ARCHIVE.refs, one JSON line per member:
{"at": offset in ARCHIVE, "path": file, "size": bytes[, "from": offset in the file]}; the reader
splices those bytes of the file (and the tar padding after them) in at that offset. Both files are
the agent's own, in its private spool.

The reader follows an archive that is still being written. The writer records a reference before it
writes any byte after its offset, so a reader that learns ARCHIVE's size before it reads the
references never reads past a member it does not know of yet.
"""

from __future__ import annotations

import json
import os

from stasis.agent.tar_split import BLOCK


def refs_path(archive: str) -> str:
    return archive + ".refs"


def add_reference(refs_fd: int, at: int, path: str, size: int, start: int = 0) -> None:
    ref = {"at": at, "path": path, "size": size, **({"from": start} if start else {})}
    line = json.dumps(ref).encode() + b"\n"
    if os.write(refs_fd, line) != len(line):   # an append this small is one write
        raise OSError(f"could not record {path} in the archive's references")


def _padded(size: int) -> int:
    return size + (-size % BLOCK)


def logical_size(archive: str) -> int:
    """The archive's size with every referenced member spliced in."""
    size = os.path.getsize(archive)
    try:
        with open(refs_path(archive), "rb") as f:
            return size + sum(_padded(json.loads(line)["size"]) for line in f if line.endswith(b"\n"))
    except FileNotFoundError:
        return size


class SplicedReader:
    """read(n): the next bytes of the archive as far as they exist now (b"" if none yet)."""

    def __init__(self, archive: str):
        self.file = open(archive, "rb")
        self.refs_file = refs_path(archive)
        self._refs: list[tuple[int, str, int, int]] = []   # (at, path, size, from): not yet reached, in order
        self._refs_seen = 0       # bytes of the references file parsed so far
        self._pos = 0             # position in the archive file itself
        self._member = None       # (open file, data bytes left, padding left) being spliced in

    def close(self) -> None:
        self.file.close()
        if self._member is not None:
            self._member[0].close()

    def read(self, n: int) -> bytes:
        if self._member is not None:
            return self._read_member(n)
        available = os.fstat(self.file.fileno()).st_size   # first: see the module's note
        self._load_refs()
        if self._refs and self._refs[0][0] == self._pos:
            _, path, size, start = self._refs.pop(0)
            f = open(path, "rb")
            f.seek(start)
            self._member = (f, size, -size % BLOCK)
            return self._read_member(n)
        limit = min(available, self._refs[0][0]) if self._refs else available
        if limit <= self._pos:
            return b""
        data = self.file.read(min(n, limit - self._pos))
        self._pos += len(data)
        return data

    def _read_member(self, n: int) -> bytes:
        f, left, pad = self._member
        if left:
            data = f.read(min(n, left))
            if not data:
                raise OSError(f"{f.name} shrank while it was sent")
            self._member = (f, left - len(data), pad)
            return data
        f.close()
        self._member = None
        return bytes(pad) if pad else self.read(n)

    def _load_refs(self) -> None:
        try:
            with open(self.refs_file, "rb") as f:
                f.seek(self._refs_seen)
                new = f.read()
        except FileNotFoundError:
            return
        complete = new[:new.rfind(b"\n") + 1]   # a line still being written waits for the next look
        self._refs_seen += len(complete)
        for line in complete.splitlines():
            ref = json.loads(line)
            self._refs.append((int(ref["at"]), str(ref["path"]), int(ref["size"]), int(ref.get("from", 0))))
