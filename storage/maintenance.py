"""Repository maintenance: info, check, prune and per-checkpoint stats (docs/repository-format.md)."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import random
from dataclasses import dataclass, field
from typing import Callable

import structlog

from stasis.errors import FailedPrecondition, IntegrityError, StasisError
from stasis.storage.backend import ObjectNotFound
from stasis.storage.crypto import content_hash
from stasis.storage.manifest import Artifact, Manifest
from stasis.storage.pack import PackBuilder, decode_blob, pack_key, read_trailer, table_chunks
from stasis.storage.repository import Repository

log = structlog.get_logger("stasis.storage")
REPACK_THRESHOLD = 0.3


def _chunk_ids(m: Manifest):
    for art in (m.checkpoint, m.image):
        if art is not None:
            for chunk_id, _ in art.chunks():
                yield chunk_id


def _present_packs(repo: Repository) -> dict[str, int]:
    return {i.key.rsplit("/", 1)[-1]: i.size for i in repo.backend.list("packs/")}


def _index_files(repo: Repository, problems: list[str] | None = None) -> dict[str, dict[str, dict]]:
    out = {}
    for info_ in repo.backend.list("index/"):
        index_id = info_.key[6:-5]
        try:
            out[index_id] = repo.read_index_file(index_id)
        except IntegrityError as exc:
            if problems is None:
                raise
            problems.append(exc.message)
    return out


def _merged(index_files: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """One view per pack across every index file that lists it (after an interrupted prune, an old
    full table and a new trimmed one may both exist): blobs by offset, chunks by id."""
    merged: dict[str, dict] = {}
    for packs in index_files.values():
        for pack_id, table in packs.items():
            m = merged.setdefault(pack_id, {"size": table["size"], "blobs": {}, "chunks": {}})
            for chunk_id, blob, offset, length in table_chunks(table):
                b = table["blobs"][blob]
                m["blobs"][b[0]] = b
                m["chunks"].setdefault(chunk_id, (b[0], offset, length))
    return merged


# ---------------------------------------------------------------------------- info and stats

def info(repo: Repository) -> dict:
    repo.refresh_index()
    manifests = list(repo.manifests())
    stored = sum(_present_packs(repo).values())
    logical = sum(a.size for m in manifests for a in (m.checkpoint, m.image) if a is not None)
    unique = sum(loc.length for loc in repo.index.values())
    c = repo.config
    return {
        "url": repo.url, "id": c.id, "format_version": 2, "encryption": c.encryption,
        "encrypted": repo.encrypted, "chunker": c.chunker.to_json(), "compression": "zstd",
        "pack_size": c.pack_size, "created": c.created, "checkpoints": len(manifests),
        "packs": len(repo.packs), "index_files": len(repo.loaded_indexes), "chunks": len(repo.index),
        "keys": len(repo.key_ids()), "logical_bytes": logical, "unique_bytes": unique, "stored_bytes": stored,
        "dedup_ratio": round(logical / unique, 3) if unique else None,
        "compression_ratio": round(unique / stored, 3) if stored else None,
        "total_ratio": round(logical / stored, 3) if stored else None,
    }


def stats(repo: Repository, checkpoint_id: str) -> dict:
    """Stored vs new bytes of one checkpoint; new = chunks that no earlier checkpoint had.

    Stored bytes are each chunk's share of its compressed blob (chunks are compressed in groups).
    """
    repo.refresh_index()
    target = repo.read_manifest(checkpoint_id)
    earlier: set[bytes] = set()
    for m in repo.manifests():
        if m.id != target.id and m.created < target.created:
            earlier.update(_chunk_ids(m))
    unique: dict[bytes, int] = {}
    count = 0
    for art in (target.checkpoint, target.image):
        for chunk_id, size in art.chunks() if art else ():
            unique[chunk_id] = size
            count += 1
    new = {i: s for i, s in unique.items() if i not in earlier}

    def stored(ids) -> int:
        total = 0.0
        for i in ids:
            loc = repo.index.get(i)
            if loc is not None:
                total += loc.blob_length * loc.length / max(loc.blob_plain, 1)
        return round(total)

    logical = target.checkpoint.size + (target.image.size if target.image else 0)
    return {"id": target.id, "container": target.container.name, "created": target.created,
            "logical_bytes": logical, "chunks": count, "unique_chunks": len(unique),
            "unique_bytes": sum(unique.values()), "stored_bytes": stored(unique), "new_chunks": len(new),
            "new_bytes": sum(new.values()), "new_stored_bytes": stored(new)}


# ---------------------------------------------------------------------------- check

@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    damaged_checkpoints: set[str] = field(default_factory=set)
    checkpoints: int = 0
    packs: int = 0
    packs_read: int = 0
    unreferenced_packs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "damaged_checkpoints": sorted(self.damaged_checkpoints),
                "checkpoints": self.checkpoints, "packs": self.packs, "packs_read": self.packs_read,
                "unreferenced_packs": self.unreferenced_packs}


def check(repo: Repository, read_data: bool = False, subset: float = 1.0,
          progress: Callable[[int, int], None] | None = None) -> CheckReport:
    report = CheckReport()
    with repo.lock("shared"):
        tables = _merged(_index_files(repo, report.problems))   # every index's view of each pack
        chunk_pack: dict[bytes, str] = {}
        for pack_id, m in tables.items():
            for chunk_id in m["chunks"]:
                chunk_pack.setdefault(chunk_id, pack_id)
        users: dict[bytes, set[str]] = collections.defaultdict(set)
        for ident in repo.checkpoint_ids():
            report.checkpoints += 1
            try:
                m = repo.read_manifest(ident)
            except StasisError as exc:
                report.problems.append(f"checkpoint {ident}: {exc.message}")
                report.damaged_checkpoints.add(ident)
                continue
            missing = 0
            for chunk_id in _chunk_ids(m):
                users[chunk_id].add(ident)
                missing += chunk_id not in chunk_pack
            if missing:
                report.problems.append(f"checkpoint {ident}: {missing} chunks are in no index")
                report.damaged_checkpoints.add(ident)

        def affected(pack_id: str) -> set[str]:
            return {cp for chunk_id in tables[pack_id]["chunks"] for cp in users.get(chunk_id, ())}

        def damage(problem: str, pack_id: str) -> None:
            hit = affected(pack_id)
            report.problems.append(f"{problem}; it holds data of checkpoints {', '.join(sorted(hit)) or '(none)'}")
            report.damaged_checkpoints.update(hit)

        present = _present_packs(repo)
        report.packs = len(tables)
        report.unreferenced_packs = len(set(present) - set(tables))
        for pack_id, table in tables.items():
            size = present.get(pack_id)
            if size is None:
                damage(f"pack {pack_id[:12]} is missing", pack_id)
            elif size != table["size"]:
                damage(f"pack {pack_id[:12]} has {size} bytes, not {table['size']}", pack_id)
        if read_data:
            todo = sorted(p for p in tables if present.get(p) == tables[p]["size"])
            if subset < 1.0 and todo:
                todo = random.sample(todo, max(1, round(len(todo) * subset)))
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                results = pool.map(lambda p: _read_pack(repo, p, tables[p]), todo)
                for n, (pack_id, problem) in enumerate(zip(todo, results, strict=True), 1):
                    report.packs_read += 1
                    if progress:
                        progress(n, len(todo))
                    if problem:
                        damage(problem, pack_id)
    return report


def _read_pack(repo: Repository, pack_id: str, merged: dict) -> str | None:
    """Read a whole pack: its own hash, its trailer, every blob, every chunk's keyed id."""
    what = f"pack {pack_id[:12]}"
    try:
        data = repo.backend.load(pack_key(pack_id))
    except ObjectNotFound:
        return f"{what} is missing"
    if content_hash(data) != pack_id:
        return f"{what} is corrupted (its hash does not match its name)"
    try:
        read_trailer(repo.sealer, data, what)
        by_blob: dict[int, list] = collections.defaultdict(list)
        for chunk_id, (blob_offset, offset, length) in merged["chunks"].items():
            by_blob[blob_offset].append((chunk_id, offset, length))
        for blob_offset, members in sorted(by_blob.items()):
            _, b_len, b_plain = merged["blobs"][blob_offset]
            plain = decode_blob(repo.sealer, data[blob_offset:blob_offset + b_len], b_plain,
                                f"{what} blob at {blob_offset}")
            for chunk_id, offset, length in members:
                if repo.sealer.chunk_id(plain[offset:offset + length]) != chunk_id:
                    return f"{what}: chunk {chunk_id.hex()[:12]} does not match its id"
    except IntegrityError as exc:
        return exc.message
    return None


# ---------------------------------------------------------------------------- prune

def prune(repo: Repository, dry_run: bool = False, repack_threshold: float = REPACK_THRESHOLD,
          wait: float = 0.0) -> dict:
    """Remove data no checkpoint references, safely against concurrent writers (exclusive lock)."""
    with repo.lock("exclusive", wait=wait):
        used: set[bytes] = set()
        ids = repo.checkpoint_ids()
        for ident in ids:
            try:
                used.update(_chunk_ids(repo.read_manifest(ident)))
            except StasisError as exc:   # never delete on doubt
                raise FailedPrecondition(f"prune stopped, nothing deleted: checkpoint {ident} is unreadable "
                                         f"({exc.message}); run 'stasis repo check'") from None
        index_files = _index_files(repo)
        present = _present_packs(repo)

        # Each used chunk is kept in one place: the first present pack listing it.
        tables = _merged(index_files)
        home: dict[bytes, str] = {}
        for pack_id, m in tables.items():
            if pack_id in present:
                for chunk_id in m["chunks"]:
                    if chunk_id in used:
                        home.setdefault(chunk_id, pack_id)
        lost = used - set(home)
        if lost:
            raise FailedPrecondition(f"prune stopped, nothing deleted: {len(lost)} chunks in use are in no "
                                     f"present pack; run 'stasis repo check'")

        keep: dict[str, dict] = {}
        repack: dict[str, list] = {}
        delete: list[str] = []
        for pack_id, m in tables.items():
            if pack_id not in present:
                continue
            mine = [(cid, *where) for cid, where in m["chunks"].items() if home.get(cid) == pack_id]
            used_bytes = sum(m["blobs"][b][1] for b in {c[1] for c in mine})
            if not mine:
                delete.append(pack_id)
            elif 1 - used_bytes / max(present[pack_id], 1) > repack_threshold:
                repack[pack_id] = mine
            else:
                keep[pack_id] = _subtable(m, present[pack_id], mine)
        orphans = [p for p in present if p not in tables]
        freed = sum(present[p] for p in delete + orphans) + sum(
            present[p] - sum(tables[p]["blobs"][b][1] for b in {c[1] for c in mine}) for p, mine in repack.items())
        report = {"dry_run": dry_run, "checkpoints": len(ids), "used_chunks": len(used),
                  "packs_before": len(present), "packs_deleted": len(delete) + len(orphans),
                  "packs_repacked": len(repack), "index_files_replaced": len(index_files), "bytes_freed": freed}
        if dry_run:
            return report

        keep.update(_repack(repo, tables, repack))
        new_index = repo.write_index(keep) if keep else ""
        # Old index files go before the packs they name: at every moment every index names only
        # packs that exist, and every used chunk is reachable through the new index.
        for index_id in index_files:
            if index_id != new_index:
                _remove(repo, f"index/{index_id}.json")
        for pack_id in delete + orphans + list(repack):
            _remove(repo, pack_key(pack_id))
        for hint in list(repo.backend.list("images/")):
            if not _hint_alive(repo, hint.key, used):
                _remove(repo, hint.key)
        repo.index, repo.packs, repo.loaded_indexes = {}, {}, set()
        repo.refresh_index()
        report["packs_after"] = len(_present_packs(repo))
        log.info("prune done", **report)
        return report


def _subtable(merged: dict, size: int, mine: list) -> dict:
    """A pack table listing only the blobs and chunks still in use. `mine` holds
    (chunk id, blob offset, offset in blob, length)."""
    blobs = sorted({c[1] for c in mine})
    number = {offset: n for n, offset in enumerate(blobs)}
    return {"size": size, "blobs": [merged["blobs"][b] for b in blobs], "ids": b"".join(c[0] for c in mine),
            "chunks": [[number[c[1]], c[2], c[3]] for c in mine]}


def _repack(repo: Repository, tables: dict[str, dict], repack: dict[str, list]) -> dict[str, dict]:
    """Copy the used blobs of sparse packs into new packs (verified first; sealed bytes copied as-is)."""
    new: dict[str, dict] = {}
    builder = PackBuilder()

    def flush() -> None:
        nonlocal builder
        if builder.blobs:
            pack_id, data, table = builder.finish(repo.sealer)
            repo.backend.save(pack_key(pack_id), data)
            new[pack_id] = table
            builder = PackBuilder()

    for pack_id, mine in repack.items():
        data = repo.backend.load(pack_key(pack_id))
        by_blob: dict[int, list] = collections.defaultdict(list)
        for chunk_id, blob, offset, length in mine:
            by_blob[blob].append((chunk_id, offset, length))
        for blob, members in sorted(by_blob.items()):
            b_off, b_len, b_plain = tables[pack_id]["blobs"][blob]   # blobs keyed by their offset
            sealed = data[b_off:b_off + b_len]
            plain = decode_blob(repo.sealer, sealed, b_plain, f"pack {pack_id[:12]} blob {blob}")
            for chunk_id, offset, length in members:
                if repo.sealer.chunk_id(plain[offset:offset + length]) != chunk_id:
                    raise IntegrityError(f"pack {pack_id[:12]}: chunk {chunk_id.hex()[:12]} is damaged; "
                                         f"prune stopped before deleting anything")
            builder.add(sealed, b_plain, members)
            if builder.size >= repo.config.pack_size:
                flush()
    flush()
    return new


def _hint_alive(repo: Repository, key: str, used: set[bytes]) -> bool:
    try:
        artifact = Artifact.from_json(json.loads(repo.sealer.open(repo.backend.load(key), key.encode(), key)), key)
    except (ObjectNotFound, IntegrityError, ValueError):
        return False
    return all(chunk_id in used for chunk_id, _ in artifact.chunks())


def _remove(repo: Repository, key: str) -> None:
    try:
        repo.backend.remove(key)
    except ObjectNotFound:
        pass
