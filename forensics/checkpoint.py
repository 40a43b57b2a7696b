"""A checkpoint opened for investigation, read in place and seen as plain dicts.

The archive (podman's export tar) is hostile input: forensics.archive checks every member header
and finds the members without unpacking anything. Opened from the repository, the archive is a
storage.artifact_file.ArtifactFile, so a question fetches only the chunks it reads: the tar headers,
the small CRIU images it decodes, the pages it looks at. rootfs-diff.tar is read the same way, its
headers for a listing and one member's bytes for dump-file.

Views (summary, processes, files, sockets, namespaces, mounts, maps, stats, fs) and grep() return plain dicts
and lists, ready for JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import socket
import struct
import tarfile
import zlib
from typing import Any, BinaryIO, Callable

from stasis.errors import FailedPrecondition, InvalidArgument, NotFound
from stasis.forensics.archive import (SMALL_FILES, ArchiveError, ArchiveIndex, Folder, Prefixed, _first_line,
                                      check_member)
from stasis.forensics.images import ImageError, dump_stats, read_image
from stasis.forensics.memory import PAGE_SIZE, PE_PARENT, PE_PRESENT, ProcessMemory
from stasis.forensics.namespaces import namespaces
from stasis.forensics.socket_queues import queued

__all__ = ["ArchiveError", "Checkpoint", "check_member"]

MAX_FS_ENTRIES = 1_000_000     # rootfs-diff.tar entries listed
MAX_ARGS = 1 << 20             # argv / environment bytes read per process
MAX_HITS = 1000
MAX_DUMP_FILE = 4 << 30        # dump-file: one changed file
MAX_DUMP_MEMORY = 1 << 30      # dump-memory: one span
SEARCH_BLOCK = 4 << 20         # grep reads memory this much at a time (a few blobs fetched in parallel)

TASK_STATES = {1: "alive", 2: "dead", 3: "stopped", 4: "helper", 6: "zombie"}
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
              7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}
SOCK_TYPES = {1: "stream", 2: "dgram", 3: "raw", 5: "seqpacket"}
IP_PROTOS = {6: "tcp", 17: "udp", 136: "udplite", 1: "icmp", 58: "icmpv6", 255: "raw"}


class Checkpoint:
    """A checkpoint's archive, read in place. Use as a context manager (or close())."""

    def __init__(self, source, manifest=None, closer: Callable[[], None] | None = None):
        """`source`: a forensics.archive.ArchiveIndex, or a Folder of an unpacked checkpoint (or its path)."""
        self.source = Folder(source) if isinstance(source, (str, os.PathLike)) else source
        self.images = Prefixed(self.source, "checkpoint/")
        self.manifest = manifest
        self.archive_size = self.source.archive_size
        self._closer = closer
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------------ opening

    @classmethod
    def from_archive(cls, archive: str, manifest=None) -> "Checkpoint":
        """A podman checkpoint archive (a plain tar) on a local disk."""
        try:
            fd = os.open(archive, os.O_RDONLY)
        except OSError as e:
            raise ArchiveError(f"the checkpoint archive cannot be read: {e.strerror or e}") from None
        try:
            index = ArchiveIndex(lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size)
            return cls(index, manifest, closer=lambda: os.close(fd))
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, repo, checkpoint_id: str) -> "Checkpoint":
        """A checkpoint of `repo`, read in place: each question fetches (and verifies) only what it reads."""
        from stasis.storage.artifact_file import ArtifactFile

        manifest = repo.read_manifest(checkpoint_id)
        if manifest.checkpoint.size == 0:
            raise FailedPrecondition(f"checkpoint {manifest.id} went straight from agent to agent: "
                                     f"its archive is not in {repo.url}")
        archive = ArtifactFile(repo, manifest.checkpoint, what=f"checkpoint {manifest.id}")
        try:
            ckpt = cls(ArchiveIndex(archive.pread, archive.size), manifest, closer=archive.close)
        except BaseException:
            archive.close()
            raise
        ckpt.archive, ckpt.repo = archive, repo
        return ckpt

    @property
    def fetched_bytes(self) -> int | None:
        """Bytes loaded from the repository so far (None for a local archive)."""
        archive = getattr(self, "archive", None)
        return archive.fetched if archive is not None else None

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ images

    def _img(self, name: str, expect: str = ""):
        key = f"img:{name}"
        if key not in self._cache:
            data = self.images.read(name)
            self._cache[key] = None if data is None else read_image(data, name, expect)
        return self._cache[key]

    def _need(self, name: str, expect: str):
        img = self._img(name, expect)
        if img is None:
            raise ImageError(f"the checkpoint lacks {name}")
        return img

    def _pstree(self) -> list:
        return self._need("pstree.img", "pstree").entries

    def _core(self, pid: int):
        img = self._img(f"core-{pid}.img", "core")
        return img.entries[0] if img and img.entries else None

    def _ids(self, pid: int):
        img = self._img(f"ids-{pid}.img", "ids")
        if img and img.entries:
            return img.entries[0]
        core = self._core(pid)
        return core.ids if core is not None and core.HasField("ids") else None

    def _mm(self, pid: int):
        img = self._img(f"mm-{pid}.img", "mm")
        return img.entries[0] if img and len(img.entries) == 1 else None

    def _files(self) -> dict[int, Any]:
        if "files" not in self._cache:
            img = self._img("files.img", "files")
            self._cache["files"] = {e.id: e for e in img.entries} if img else {}
        return self._cache["files"]

    def _json(self, name: str) -> dict:
        try:
            doc = json.loads(self.source.read(name, SMALL_FILES[name]) or b"{}")
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _pids(self) -> list[int]:
        return [e.pid for e in self._pstree()]

    def _comm(self, pid: int) -> str:
        core = self._core(pid)
        return core.tc.comm if core is not None and core.HasField("tc") else ""

    # ------------------------------------------------------------------ views

    def summary(self) -> dict:
        config, m = self._json("config.dump"), self.manifest
        pages = sum(self.memory_pages().values())
        uts = next((self._img(n, "utsns") for n in self._names(r"utsns-\d+\.img")), None)
        fs = self.fs(against_image=False)
        doc = {
            "checkpoint": m.id if m else "",
            "container": {"name": m.container.name if m else str(config.get("name", "")),
                          "id": m.container.id if m else str(config.get("id", "")),
                          "image": m.container.image if m else str(config.get("rootfsImageName", "")),
                          "hostname": uts.entries[0].nodename if uts and uts.entries else ""},
            "host": m.host if m else "", "runtime": m.runtime if m else "",
            "runtime_version": m.runtime_version if m else "",
            "criu_version": m.criu_version if m else "",
            "created": m.created if m else "",
            "container_created": str(config.get("createdTime", "")),
            "leave_running": m.leave_running if m else None,
            "processes": len(self._pids()),
            "sizes": {"archive_bytes": self.archive_size, "memory_pages": pages,
                      "memory_bytes": pages * PAGE_SIZE, "rootfs_diff_bytes": self.source.size("rootfs-diff.tar") or 0,
                      "images_bytes": sum(self.images.size(n) or 0 for n in self.images.names())},
            "fs_changes": {"changed": len(fs["changed"]), "deleted": len(fs["deleted"])},
        }
        return doc

    def memory_pages(self) -> dict[int, int]:
        """pid → pages CRIU wrote to this checkpoint's pages images (0 for a process without memory)."""
        out = {}
        for pid in self._pids():
            pm, pages = self._img(f"pagemap-{pid}.img", "pagemap"), 0
            for e in pm.entries if pm else ():
                flags = e.flags if e.HasField("flags") else (PE_PARENT if e.in_parent else PE_PRESENT)
                pages += e.nr_pages if flags & PE_PRESENT else 0
            out[pid] = pages
        return out

    def processes(self, cmdline: bool = False, env: bool = False) -> list[dict]:
        out = []
        for e in self._pstree():
            core = self._core(e.pid)
            doc: dict[str, Any] = {"pid": e.pid, "ppid": e.ppid, "pgid": e.pgid, "sid": e.sid,
                                   "threads": list(e.threads), "comm": self._comm(e.pid), "state": "",
                                   "uid": None, "gid": None, "euid": None, "egid": None, "cap_eff": None}
            if core is not None and core.HasField("tc"):
                doc["state"] = TASK_STATES.get(core.tc.task_state, str(core.tc.task_state))
            if core is not None and core.HasField("thread_core") and core.thread_core.HasField("creds"):
                c = core.thread_core.creds
                doc.update(uid=c.uid, gid=c.gid, euid=c.euid, egid=c.egid, groups=list(c.groups),
                           cap_eff=f"{_caps(c.cap_eff):#x}", cap_prm=f"{_caps(c.cap_prm):#x}")
            if cmdline or env:
                args, environ = self._args(e.pid, cmdline, env)
                if cmdline:
                    doc["argv"] = args
                if env:
                    doc["env"] = environ
            out.append(doc)
        return out

    def _args(self, pid: int, cmdline: bool, env: bool) -> tuple[list[str] | None, list[str] | None]:
        mm = self._mm(pid)
        if mm is None or self.images.size(f"pagemap-{pid}.img") is None:
            return None, None   # a zombie or a helper has no memory
        with ProcessMemory.open(self.images, pid) as mem:
            def strings(start: int, end: int) -> list[str]:
                if end <= start:
                    return []
                raw = mem.read(start, min(end - start, MAX_ARGS))
                items = raw.split(b"\0")
                if items and items[-1] == b"":
                    items.pop()
                return [i.decode("utf-8", "backslashreplace") for i in items]
            return (strings(mm.mm_arg_start, mm.mm_arg_end) if cmdline else None,
                    strings(mm.mm_env_start, mm.mm_env_end) if env else None)

    def _describe(self, fid: int) -> tuple[str, str]:
        """(type, path or description) of a file id in files.img."""
        from stasis.forensics.criu_pb import fdinfo_pb2

        f = self._files().get(fid)
        if f is None:
            return "unknown", f"file id {fid} (not in files.img)"
        kind = fdinfo_pb2.fd_types.Name(f.type) if f.type in fdinfo_pb2.fd_types.values() else str(f.type)
        if f.HasField("reg"):
            return kind, f.reg.name
        if f.HasField("pipe"):
            return kind, f"pipe:[{f.pipe.pipe_id}]"
        if f.HasField("fifo"):
            return kind, f"fifo:[{f.fifo.pipe_id}]"
        if f.HasField("usk"):
            return kind, f"socket:[{f.usk.ino}]" + (f" {_unix_name(f.usk)}" if f.usk.name else "")
        if f.HasField("isk"):
            return kind, f"socket:[{f.isk.ino}] {_inet_local(f.isk)}"
        if f.HasField("tty"):
            return kind, f"tty index {f.tty.index}" if hasattr(f.tty, "index") else "tty"
        if f.HasField("memfd"):
            return kind, "memfd"
        return kind, kind.lower()

    def files(self) -> list[dict]:
        out = []
        for pid in self._pids():
            ids = self._ids(pid)
            fdinfo = self._img(f"fdinfo-{ids.files_id if ids else pid}.img", "fdinfo")
            fds = []
            for e in fdinfo.entries if fdinfo else ():
                kind, path = self._describe(e.id)
                fds.append({"fd": e.fd, "type": kind, "path": path, "flags": e.flags, "file_id": e.id})
            fds.sort(key=lambda d: d["fd"])
            fs = self._img(f"fs-{pid}.img", "fs")
            mm = self._mm(pid)
            out.append({"pid": pid, "comm": self._comm(pid), "fds": fds,
                        "cwd": self._describe(fs.entries[0].cwd_id)[1] if fs and fs.entries else None,
                        "root": self._describe(fs.entries[0].root_id)[1] if fs and fs.entries else None,
                        "exe": self._describe(mm.exe_file_id)[1] if mm is not None else None})
        return out

    def _holders(self) -> dict[int, list[dict]]:
        holders: dict[int, list[dict]] = {}
        for doc in self.files():
            for fd in doc["fds"]:
                holders.setdefault(fd["file_id"], []).append({"pid": doc["pid"], "fd": fd["fd"]})
        return holders

    def sockets(self) -> list[dict]:
        holders, out = self._holders(), []
        entries = [(f.id, f.usk, None) for f in self._files().values() if f.HasField("usk")]
        entries += [(f.id, None, f.isk) for f in self._files().values() if f.HasField("isk")]
        for name, kind in (("unixsk.img", "unixsk"), ("inetsk.img", "inetsk")):     # CRIU before 3.x
            img = self._img(name, kind)
            for e in img.entries if img else ():
                entries.append((e.id, e, None) if kind == "unixsk" else (e.id, None, e))
        queues = queued(self._img, self._names)
        for fid, usk, isk in entries:
            # Bytes waiting: a unix socket's receive queue (sk-queues.img), a TCP connection's queues
            # (tcp-stream-INO.img, with --tcp-established); sizes only, never the bytes.
            q = queues["by_id"].get(fid, {})
            tcp = queues["tcp_by_inode"].get(isk.ino, {}) if isk is not None else {}
            waiting = {"recv_queue_bytes": tcp.get("recv_queue_bytes", q.get("recv_queue_bytes", 0)),
                       "recv_queue_packets": q.get("recv_queue_packets", 0),
                       "send_queue_bytes": tcp.get("send_queue_bytes", 0)}
            if usk is not None:
                out.append({"family": "unix", "ino": usk.ino, "type": SOCK_TYPES.get(usk.type, str(usk.type)),
                            "state": TCP_STATES.get(usk.state, str(usk.state)), "address": _unix_name(usk),
                            "peer": usk.peer or None, "backlog": usk.backlog, **waiting,
                            "held_by": holders.get(fid, [])})
            else:
                family = "inet6" if isk.family == socket.AF_INET6 else "inet"
                out.append({"family": family, "ino": isk.ino, "proto": IP_PROTOS.get(isk.proto, str(isk.proto)),
                            "type": SOCK_TYPES.get(isk.type, str(isk.type)),
                            "state": TCP_STATES.get(isk.state, str(isk.state)),
                            "local": _addr(isk.family, isk.src_addr), "local_port": isk.src_port,
                            "remote": _addr(isk.family, isk.dst_addr), "remote_port": isk.dst_port,
                            "backlog": isk.backlog, **waiting, "held_by": holders.get(fid, [])})
        return out

    def namespaces(self) -> dict:
        """Which processes share which namespaces, and what CRIU recorded of each (forensics.namespaces)."""
        return namespaces(self._img, self._names, self._pids, self._ids, raw=self.images.read)

    def mounts(self) -> list[dict]:
        from stasis.forensics.criu_pb import mnt_pb2

        out = []
        for name in self._names(r"mountpoints-\d+\.img"):
            for e in self._img(name, "mountpoints").entries:
                fstype = mnt_pb2.fstype.Name(e.fstype) if e.fstype in mnt_pb2.fstype.values() else str(e.fstype)
                out.append({"mnt_id": e.mnt_id, "parent": e.parent_mnt_id, "mountpoint": e.mountpoint,
                            "fstype": e.fsname or fstype.lower(), "source": e.source, "root": e.root,
                            "options": e.options, "external": e.ext_key or None, "namespace": name[12:-4]})
        out.sort(key=lambda d: (d["namespace"], d["mountpoint"]))
        return out

    def maps(self) -> list[dict]:
        out = []
        for pid in self._pids():
            if self._mm(pid) is None or self._img(f"pagemap-{pid}.img", "pagemap") is None:
                continue
            with ProcessMemory.open(self.images, pid) as mem:
                dumped: dict[int, int] = {}
                for r in mem.ranges():
                    if r.vma is not None:
                        dumped[r.vma.start] = dumped.get(r.vma.start, 0) + r.end - r.start
                out.append({"pid": pid, "comm": self._comm(pid), "maps": [
                    {"start": f"{v.start:#x}", "end": f"{v.end:#x}", "perms": v.perms, "offset": v.pgoff,
                     "size": v.end - v.start, "dumped": dumped.get(v.start, 0), "mapping": v.label}
                    for v in mem.vmas]})
        return out

    def stats(self) -> dict:
        data = self.source.read("stats-dump", SMALL_FILES["stats-dump"])
        if data is None:
            return {}
        return dump_stats(data)

    def fs(self, against_image: bool = True) -> dict:
        """Filesystem changes. With the image's archive in the repository (agents store it with the
        checkpoint) and `against_image`, each changed path is also "added" or "modified"."""
        if f"fs:{against_image}" in self._cache:
            return self._cache[f"fs:{against_image}"]
        if against_image:
            doc = dict(self.fs(against_image=False))
            paths = self._image_paths()
            doc["image_compared"] = paths is not None
            doc["changed"] = [{**f, "change": None if paths is None else "modified" if f["path"] in paths
                               else "added"} for f in doc["changed"]]
            self._cache["fs:True"] = doc
            return doc
        changed: list[dict] = []
        diff = self.source.open("rootfs-diff.tar")
        if diff is not None:
            try:
                with diff, tarfile.open(fileobj=diff, mode="r:*") as tar:
                    while (m := tar.next()) is not None:
                        if len(changed) >= MAX_FS_ENTRIES:
                            raise ArchiveError(f"rootfs-diff.tar lists more than {MAX_FS_ENTRIES} files")
                        changed.append({"path": "/" + m.name.removeprefix("./").lstrip("/"), "type": _tar_type(m),
                                        "size": m.size if m.isfile() else 0, "mode": f"{m.mode & 0o7777:04o}",
                                        **({"target": m.linkname} if m.issym() or m.islnk() else {})})
            except (tarfile.TarError, EOFError) as e:
                raise ArchiveError(f"rootfs-diff.tar is not a readable tar file ({_first_line(e)})") from None
        deleted, refused = [], []
        try:
            raw = json.loads(self.source.read("deleted.files", SMALL_FILES["deleted.files"]) or b"[]")
        except (OSError, ValueError) as e:
            raise ArchiveError(f"deleted.files is not a JSON list of paths ({_first_line(e)})") from None
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            raise ArchiveError("deleted.files is not a JSON list of paths")
        for p in raw:
            if ".." in p.split("/") or "\0" in p:
                refused.append(p)
            else:
                deleted.append(posixpath.normpath("/" + p.lstrip("/")))
        self._cache["fs:False"] = {"changed": changed, "deleted": sorted(deleted), "refused_deletions": refused}
        return self._cache["fs:False"]

    def _image_paths(self) -> set[str] | None:
        """The paths of the container's image, when the repository holds its archive; else None."""
        from stasis.forensics.image_files import image_paths
        from stasis.storage.artifact_file import ArtifactFile

        repo, m = getattr(self, "repo", None), self.manifest
        if repo is None or m is None:
            return None
        artifact = m.image or repo.image_artifact(m.container.image_id)
        if artifact is None:
            return None
        with ArtifactFile(repo, artifact, what=f"the image of checkpoint {m.id}") as f:
            paths = image_paths(f.pread, f.size, f"the image archive of checkpoint {m.id}")
            self.image_fetched = f.fetched
        return paths

    def _names(self, pattern: str) -> list[str]:
        return [n for n in self.images.names() if re.fullmatch(pattern, n)]

    # ------------------------------------------------------------------ extraction

    def dump_file(self, path: str, out: BinaryIO, limit: int = MAX_DUMP_FILE) -> dict:
        """Copy the changed file `path` (absolute, in the container) out of rootfs-diff.tar into `out`.

        Only a regular file within `limit` bytes is copied; a link, folder or device is refused, and
        so is any member whose name climbs with '..'. The last member of that name wins, as when
        podman unpacks the tar.
        """
        if not path.startswith("/") or "\0" in path:
            raise InvalidArgument(f"{path!r}: give the file's absolute path in the container, like /etc/passwd")
        if ".." in path.split("/"):
            raise InvalidArgument(f"{path!r}: a path in the container has no '..'")
        want = "/" + posixpath.normpath(path).lstrip("/")
        diff = self.source.open("rootfs-diff.tar")
        if diff is None:
            raise NotFound(f"{want}: the checkpoint holds no filesystem changes (no rootfs-diff.tar); "
                           f"its files are the image's")
        try:
            with diff, tarfile.open(fileobj=diff, mode="r:*") as tar:
                found, count = None, 0
                while (m := tar.next()) is not None:
                    count += 1
                    if count > MAX_FS_ENTRIES:
                        raise ArchiveError(f"rootfs-diff.tar lists more than {MAX_FS_ENTRIES} files")
                    if ".." in m.name.split("/") or "\0" in m.name:
                        continue
                    if "/" + posixpath.normpath(m.name).lstrip("/") == want:
                        found = m
                if found is None:
                    if want in self.fs(against_image=False)["deleted"]:
                        raise NotFound(f"{want} was deleted in the container: the checkpoint has no content for it")
                    raise NotFound(f"{want} is not among the checkpoint's changed files (the others are the "
                                   f"image's); list them with 'stasis inspect ID --fs'")
                if found.issym() or found.islnk():
                    kind = "a symlink" if found.issym() else "a hard link"
                    raise FailedPrecondition(f"{want} is {kind} to {found.linkname[:200]!r} in the checkpoint: "
                                             f"dump-file copies regular files only (dump the target instead)")
                if not found.isfile():
                    raise FailedPrecondition(f"{want} is a {_tar_type(found)} in the checkpoint, not a regular "
                                             f"file: dump-file copies regular files only")
                if found.size > limit:
                    raise FailedPrecondition(f"{want} is {found.size} bytes, over the limit of {limit}")
                digest, left = hashlib.sha256(), found.size
                src = tar.extractfile(found)
                with src:
                    while left > 0:
                        block = src.read(min(left, 1 << 20))
                        if not block:
                            raise ArchiveError(f"rootfs-diff.tar is truncated inside {want}")
                        out.write(block)
                        digest.update(block)
                        left -= len(block)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ArchiveError(f"rootfs-diff.tar is not a readable tar file ({_first_line(e)})") from None
        return {"checkpoint": self.manifest.id if self.manifest else "", "path": want, "size": found.size,
                "mode": f"{found.mode & 0o7777:04o}", "uid": found.uid, "gid": found.gid, "mtime": found.mtime,
                "sha256": digest.hexdigest()}

    def dump_memory(self, pid: int, addr: int, length: int, out: BinaryIO, limit: int = MAX_DUMP_MEMORY) -> dict:
        """Write `length` bytes of process `pid`'s memory from `addr` into `out`.

        Bytes the checkpoint lacks are written as zeros and listed in "missing", each span with why:
        "not dumped" (mapped, but CRIU did not write those pages: never touched, or a clean file
        page) or "not mapped" (no mapping there at all).
        """
        if not 1 <= length <= limit:
            raise InvalidArgument(f"--len must be 1 to {limit} bytes; dump a larger span in pieces")
        pids = self._pids()
        if pid not in pids:
            raise InvalidArgument(f"the checkpoint has no process {pid} (it has {', '.join(map(str, pids))})")
        if self._mm(pid) is None or self._img(f"pagemap-{pid}.img", "pagemap") is None:
            raise FailedPrecondition(f"process {pid} has no dumped memory (a zombie or a helper)")
        with ProcessMemory.open(self.images, pid) as mem:
            holes = mem.holes(addr, length)          # also refuses a span beyond 64 bits
            digest, pos, end = hashlib.sha256(), addr, addr + length
            while pos < end:
                data = mem.read(pos, min(16 << 20, end - pos))
                out.write(data)
                digest.update(data)
                pos += len(data)
            missing = []
            for lo, hi in holes:
                for a, b, vma in _split_by_vmas(mem.vmas, lo, hi):
                    missing.append({"start": f"{a:#x}", "end": f"{b:#x}", "length": b - a,
                                    "why": "not dumped" if vma else "not mapped",
                                    "mapping": f"{vma.label} {vma.perms}" if vma else None})
            mappings = [{"start": f"{v.start:#x}", "end": f"{v.end:#x}", "perms": v.perms, "mapping": v.label}
                        for v in mem.vmas if v.start < end and v.end > addr]
        return {"checkpoint": self.manifest.id if self.manifest else "", "pid": pid, "comm": self._comm(pid),
                "addr": f"{addr:#x}", "length": length, "dumped_bytes": length - sum(m["length"] for m in missing),
                "missing": missing, "mappings": mappings, "sha256": digest.hexdigest()}

    # ------------------------------------------------------------------ memory search

    def grep(self, pattern: str | bytes, regex: bool = False, pid: int | None = None, context: int = 64,
             limit: int = MAX_HITS) -> dict:
        if not 0 <= context <= 4096:
            raise InvalidArgument("--context must be 0 to 4096 bytes")
        raw = pattern.encode() if isinstance(pattern, str) else pattern
        if not raw:
            raise InvalidArgument("the pattern is empty")
        if regex:
            try:
                needle: bytes | re.Pattern[bytes] = re.compile(raw, re.DOTALL)
            except re.error as e:
                raise InvalidArgument(f"the pattern is not a valid regular expression: {e}") from None
        else:
            needle = raw
        pids = self._pids()
        if pid is not None and pid not in pids:
            raise InvalidArgument(f"the checkpoint has no process {pid} (it has {', '.join(map(str, pids))})")
        hits, truncated = [], False
        for p in [pid] if pid is not None else pids:
            if self._mm(p) is None or self._img(f"pagemap-{p}.img", "pagemap") is None:
                continue
            with ProcessMemory.open(self.images, p) as mem:
                for h in mem.search(needle, chunk=SEARCH_BLOCK):
                    if len(hits) >= limit:
                        truncated = True
                        break
                    lo = max(0, h.vaddr - context)
                    data = mem.read(lo, h.vaddr + len(h.match) + context - lo)
                    hits.append({"pid": p, "comm": self._comm(p), "vaddr": f"{h.vaddr:#x}",
                                 "mapping": h.vma.label if h.vma else "(outside every mapping)",
                                 "perms": h.vma.perms if h.vma else "",
                                 "vma": [f"{h.vma.start:#x}", f"{h.vma.end:#x}"] if h.vma else None,
                                 "match": h.match.decode("utf-8", "backslashreplace"), "length": len(h.match),
                                 "context_start": f"{lo:#x}", "hexdump": hexdump(data, lo)})
            if truncated:
                break
        return {"pattern": raw.decode("utf-8", "backslashreplace"), "regex": regex, "hits": hits,
                "truncated": truncated}


def _split_by_vmas(vmas, lo: int, hi: int) -> list[tuple[int, int, Any]]:
    """[lo, hi) cut into (start, end, the mapping or None) pieces."""
    out, pos = [], lo
    for v in vmas:
        if v.end <= pos:
            continue
        if v.start >= hi:
            break
        if v.start > pos:
            out.append((pos, v.start, None))
        stop = min(v.end, hi)
        out.append((max(v.start, pos), stop, v))
        pos = stop
    if pos < hi:
        out.append((pos, hi, None))
    return out


def hexdump(data: bytes, base: int) -> list[str]:
    lines = []
    for i in range(0, len(data), 16):
        row = data[i:i + 16]
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{base + i:016x}  {hexes:<47}  |{text}|")
    return lines


def _caps(words) -> int:
    return sum(int(w) << (32 * i) for i, w in enumerate(words))


def _unix_name(usk) -> str:
    name = bytes(usk.name)
    if not name:
        return ""
    if name[:1] == b"\0":      # abstract: every byte counts
        return "@" + name[1:].decode("utf-8", "backslashreplace")
    return name.rstrip(b"\0").decode("utf-8", "backslashreplace")


def _addr(family: int, words) -> str:
    raw = b"".join(struct.pack("<I", w) for w in words)
    try:
        if family == socket.AF_INET6:
            return socket.inet_ntop(socket.AF_INET6, raw.ljust(16, b"\0")[:16])
        return socket.inet_ntop(socket.AF_INET, raw.ljust(4, b"\0")[:4])
    except (OSError, ValueError):
        return raw.hex()


def _inet_local(isk) -> str:
    proto = IP_PROTOS.get(isk.proto, str(isk.proto))
    return f"{proto} {_addr(isk.family, isk.src_addr)}:{isk.src_port}"


def _tar_type(m: tarfile.TarInfo) -> str:
    for test, name in ((m.isfile, "file"), (m.isdir, "dir"), (m.issym, "symlink"), (m.islnk, "hardlink"),
                       (m.ischr, "char"), (m.isblk, "block"), (m.isfifo, "fifo")):
        if test():
            return name
    return "other"
