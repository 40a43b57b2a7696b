"""Files out of and archives into the repository: a safe output file, `export` and `import`.

safe_output() writes to a fresh private file beside OUT and only then puts it in place: without
force by a hard link (which fails if OUT exists, as a file, folder or dangling symlink), with force
by rename (which replaces a symlink itself, never the file it points to). OUT is never opened, so
no symlink at OUT is ever followed, and a failure leaves nothing behind.

An archive to import is hostile input, checked member by member before anything is stored
(validate_archive): every member of podman's (and a kubelet's) checkpoint archive is known by name,
everything else is refused, as are absolute names, '..', links, devices, oversized members and
deleted.files entries that escape the container's root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import zlib
from typing import BinaryIO, Iterator

from stasis.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from stasis.forensics.archive import (MAX_MEMBER, MAX_TOTAL, SMALL_FILES, ArchiveError,
                                      _first_line, add_to_total, checked_name, members, open_archive)
from stasis.forensics.checkpoint import Checkpoint

HEX64 = re.compile(r"[0-9a-f]{64}")
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}"
# Every file podman 4/5 and CRI-O (kubelet) put in a checkpoint archive.
IMPORT_FILES = {"config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files", "devshm-checkpoint.tar",
                "network.status", "stats-dump", "ctr.log", "container.log", "bind.mounts", "dump.log",
                "restore.log", "pod.options", "pod.dump", "status.dump"}
IMPORT_PATTERNS = [re.compile(p) for p in (rf"checkpoint/{_PART}", rf"volumes/{_PART}\.tar",
                                           rf"artifacts(/{_PART}){{1,8}}")]
IMPORT_DIRS = re.compile(rf"|checkpoint|volumes|artifacts(/{_PART}){{0,7}}")
SMALL_IMPORT = {**SMALL_FILES, "network.status": 16 << 20, "bind.mounts": 16 << 20, "pod.options": 1 << 20,
                "pod.dump": 16 << 20, "status.dump": 1 << 20}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@contextlib.contextmanager
def safe_output(out: str, force: bool = False) -> Iterator[tuple[BinaryIO, str]]:
    """(a file object, its temporary path) to write; on success it becomes `out`, on failure it is gone."""
    if not out:
        raise InvalidArgument("name the output file with -o")
    if os.path.lexists(out) and not force:
        raise AlreadyExists(f"{out} exists: give --force to replace it")
    if os.path.isdir(out) and not os.path.islink(out):
        raise InvalidArgument(f"{out} is a folder: name a file")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidArgument(f"{out}: the folder {parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".stasis-", dir=parent)    # O_EXCL, 0600
    except OSError as e:
        raise FailedPrecondition(f"cannot write in {parent}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, tmp
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise AlreadyExists(f"{out} exists: give --force to replace it") from None
            os.unlink(tmp)
    except OSError as e:
        raise FailedPrecondition(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# ---------------------------------------------------------------------------- export

def export_checkpoint(repo, checkpoint_id: str, out: str, force: bool = False, progress=None) -> dict:
    """Write a checkpoint's archive (podman's own format), every chunk verified, to `out`."""
    m = repo.read_manifest(checkpoint_id)
    if m.checkpoint.size == 0:
        raise FailedPrecondition(f"checkpoint {m.id} went straight from agent to agent: its archive is not in "
                                 f"{repo.url}")
    with safe_output(out, force) as (f, tmp):
        repo.fetch_file(m.checkpoint, tmp, progress, what=f"checkpoint {m.id}")
        size = os.path.getsize(tmp)
        if size != m.checkpoint.size:
            raise ArchiveError(f"checkpoint {m.id}: fetched {size} bytes, the manifest says {m.checkpoint.size}")
        digest = hashlib.sha256()
        with open(tmp, "rb") as src:
            while block := src.read(1 << 20):
                digest.update(block)
    return {"checkpoint": m.id, "out": out, "size": size, "sha256": digest.hexdigest(),
            "container": m.container.name, "image": m.container.image, "runtime": m.runtime,
            "image_archive_in_repository": m.image is not None}


# ---------------------------------------------------------------------------- import

def validate_archive(path: str) -> dict:
    """Check every member of a podman or kubelet checkpoint archive; its config and deletions.

    Returns {"members", "bytes", "config", "deleted"}; raises ArchiveError at the first hostile or
    unknown member, or if the archive is not a checkpoint.
    """
    seen: set[str] = set()
    config, deleted, total, count = None, [], 0, 0
    with open_archive(path, "read") as tar:
        for member in members(tar):
            count += 1
            name = checked_name(member)      # shape: absolute, '..', links, devices, size
            if name is None:                 # a folder
                dname = "/".join(p for p in member.name.split("/") if p not in ("", "."))
                if not IMPORT_DIRS.fullmatch(dname):
                    raise ArchiveError(f"the checkpoint archive has an unexpected folder {member.name[:120]!r}: "
                                       f"refusing it")
                continue
            if name not in IMPORT_FILES and not any(p.fullmatch(name) for p in IMPORT_PATTERNS):
                raise ArchiveError(f"the checkpoint archive has an unexpected member {member.name[:120]!r} "
                                   f"(not part of a podman or kubelet checkpoint): refusing it")
            if name in seen:
                raise ArchiveError(f"the checkpoint archive holds {name!r} twice")
            seen.add(name)
            limit = SMALL_IMPORT.get(name, MAX_MEMBER)
            if member.size > limit:
                raise ArchiveError(f"the checkpoint archive's {name} is {member.size} bytes (limit {limit})")
            total = add_to_total(total, member)
            if name in ("config.dump", "deleted.files"):
                src = tar.extractfile(member)
                raw = src.read(member.size) if src else b""
                if len(raw) != member.size:
                    raise ArchiveError(f"the checkpoint archive is truncated inside {name}")
                if name == "config.dump":
                    config = _config(raw)
                else:
                    deleted = _deletions(raw)
    for need in ("checkpoint/pstree.img", "config.dump"):
        if need not in seen:
            raise ArchiveError(f"the archive is not a podman or kubelet checkpoint: it has no {need}")
    return {"members": count, "bytes": total, "config": config, "deleted": deleted}


def _config(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveError(f"the checkpoint archive's config.dump is not JSON ({_first_line(e)})") from None
    if not isinstance(doc, dict):
        raise ArchiveError("the checkpoint archive's config.dump is not a JSON object")
    cid, name = doc.get("id"), doc.get("name")
    if not isinstance(cid, str) or not HEX64.fullmatch(cid):
        raise ArchiveError(f"the checkpoint archive's config.dump names container id {str(cid)[:80]!r}, "
                           f"not a 64-hex id")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}", name):
        raise ArchiveError(f"the checkpoint archive's config.dump names the container {str(name)[:80]!r}, "
                           f"not a valid container name")
    image = next((v for k in ("rootfsImageName", "RawImageName", "rootfsImageRef")
                  if isinstance(v := doc.get(k), str) and v), "")
    image_id = next((v.removeprefix("sha256:") for k in ("rootfsImageID", "rootfsImageRef", "rootfsImage")
                     if isinstance(v := doc.get(k), str) and HEX64.fullmatch(v.removeprefix("sha256:"))), "")
    return {"id": cid, "name": name, "image": image[:1000], "image_id": image_id,
            "created": str(doc.get("createdTime", ""))[:100]}


def _deletions(raw: bytes) -> list[str]:
    try:
        doc = json.loads(raw) if raw.strip() else []
    except (ValueError, UnicodeDecodeError) as e:
        raise ArchiveError(f"the checkpoint archive's deleted.files is not JSON ({_first_line(e)})") from None
    if not isinstance(doc, list) or not all(isinstance(p, str) for p in doc):
        raise ArchiveError("the checkpoint archive's deleted.files is not a JSON list of paths")
    for p in doc:
        if not p or "\0" in p or ".." in p.split("/"):
            raise ArchiveError(f"the checkpoint archive's deleted.files names {p[:120]!r}, which escapes the "
                               f"container's root: refusing it")
    return sorted("/" + posixpath.normpath(p).lstrip("/") for p in doc)


def _decompressed(path: str, stage: str) -> str:
    """`path` itself, or for a zstd (podman's default) or gzip archive a plain tar of it in `stage`:
    the repository keeps the plain tar, which is what dedups and what forensics reads in place."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == ZSTD_MAGIC:
        import zstandard

        kind, opener = "zstd", lambda src: zstandard.ZstdDecompressor().stream_reader(src)
        errors: tuple = (zstandard.ZstdError,)
    elif magic[:2] == b"\x1f\x8b":
        import gzip

        kind, opener = "gzip", lambda src: gzip.GzipFile(fileobj=src, mode="rb")
        errors = (OSError, EOFError, zlib.error)
    else:
        return path
    plain = os.path.join(stage, "checkpoint.tar")
    written = 0
    try:
        with open(path, "rb") as src, opener(src) as reader, open(plain, "xb") as out:
            while block := reader.read(1 << 20):
                written += len(block)
                if written > MAX_TOTAL + (1 << 30):
                    raise ArchiveError(f"the checkpoint archive decompresses to more than {MAX_TOTAL} bytes")
                out.write(block)
    except errors as e:
        raise ArchiveError(f"the checkpoint archive is not valid {kind} ({_first_line(e)})") from None
    return plain


def import_archive(repo, path: str, host: str = "imported", workdir: str | None = None) -> tuple:
    """Validate a checkpoint archive, prove it decodes, store it with a new manifest: (manifest, report)."""
    from stasis.storage.manifest import ContainerRef, Manifest
    from stasis.storage.repository import new_checkpoint_id, now_rfc3339

    if not HOST.fullmatch(host or ""):
        raise InvalidArgument(f"--host {host!r}: a host name is letters, digits, '.', '_' and '-'")
    if not os.path.isfile(path):
        raise InvalidArgument(f"{path}: no such file")
    stage = tempfile.mkdtemp(prefix="stasis-import-", dir=workdir)    # 0700
    try:
        plain = _decompressed(path, stage)
        report = validate_archive(plain)
        with Checkpoint.from_archive(plain) as ckpt:   # the CRIU images decode
            processes = len(ckpt.processes())
            stats = {k: v for k, v in ckpt.stats().items() if isinstance(v, int) and not isinstance(v, bool)}
        c = report["config"]
        stored: dict[str, int] = {}
        lock = repo.lock("shared")
        try:
            artifact = repo.store_file(plain, lock=lock, stats=stored)
            manifest = Manifest(
                id=new_checkpoint_id(), created=now_rfc3339(), host=host, runtime="podman", runtime_version="",
                criu_version="", container=ContainerRef(c["id"], c["name"], c["image"], c["image_id"] or "0" * 64),
                leave_running=False, checkpoint=artifact, image=None, timings={}, criu_stats=stats,
                tags={"imported_from": os.path.basename(path)[:200]}, new_bytes=stored.get("new_bytes", 0))
            repo.write_manifest(manifest, lock)
        finally:
            lock.release()
        report.update(processes=processes, decompressed=plain != path)
        return manifest, report
    finally:
        shutil.rmtree(stage, ignore_errors=True)
