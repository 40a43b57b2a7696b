"""check, prune, stats, info, and prune against concurrent writers; chunker properties."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stasis.errors import FailedPrecondition
from stasis.storage import maintenance
from stasis.storage.chunker import ChunkerParams, cut_file
from stasis.storage.manifest import ContainerRef, Manifest
from stasis.storage.memory import MemoryBackend
from stasis.storage.repository import Repository, new_checkpoint_id, now_rfc3339

PAGE = 4096


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)


@pytest.fixture
def repo():
    return Repository.init(f"memory://{uuid.uuid4().hex}", "pw", pack_size=1 << 20)


def tar_of(path, pages: bytes) -> str:
    with tarfile.open(path, "w") as t:
        info = tarfile.TarInfo("pages-1.img")
        info.size = len(pages)
        t.addfile(info, io.BytesIO(pages))
    return str(path)


def checkpoint(repo, tmp_path, pages: bytes, created: str | None = None) -> Manifest:
    art = repo.store_file(tar_of(tmp_path / f"{uuid.uuid4().hex}.tar", pages))
    m = Manifest(id=new_checkpoint_id(), created=created or now_rfc3339(), host="h", runtime="podman",
                 runtime_version="4", criu_version="4.1.1", container=ContainerRef("c" * 64, "web", "img", "d" * 64),
                 leave_running=True, checkpoint=art, image=None, timings={}, criu_stats={})
    repo.write_manifest(m)
    return m


def restorable(repo, m: Manifest, tmp_path) -> bool:
    out = tmp_path / f"r-{m.id}"
    repo.fetch_file(m.checkpoint, str(out))
    return out.stat().st_size == m.checkpoint.size


def test_prune_frees_forgotten_data_and_keeps_the_rest(repo, tmp_path):
    keep = checkpoint(repo, tmp_path, os.urandom(300 * PAGE))
    gone = checkpoint(repo, tmp_path, os.urandom(300 * PAGE))
    before = maintenance.info(repo)["stored_bytes"]
    repo.remove_checkpoint(gone.id)
    dry = maintenance.prune(repo, dry_run=True)
    assert dry["bytes_freed"] > 0 and maintenance.info(repo)["stored_bytes"] == before
    report = maintenance.prune(repo)
    after = maintenance.info(repo)["stored_bytes"]
    assert report["bytes_freed"] > 0 and after < before * 0.6
    fresh = Repository.open(repo.url, "pw", repo.backend)
    assert restorable(fresh, keep, tmp_path)
    assert maintenance.check(fresh, read_data=True).ok


def test_prune_repacks_sparse_packs(tmp_path):
    repo = Repository.init(f"memory://{uuid.uuid4().hex}", None, encrypt=False, pack_size=8 << 20)
    data = bytearray(os.urandom(600 * PAGE))
    first = checkpoint(repo, tmp_path, bytes(data))
    data[: 400 * PAGE] = os.urandom(400 * PAGE)
    second = checkpoint(repo, tmp_path, bytes(data))
    repo.remove_checkpoint(first.id)
    report = maintenance.prune(repo)
    assert report["packs_repacked"] >= 1
    assert restorable(Repository.open(repo.url, None, repo.backend), second, tmp_path)


def test_prune_refuses_while_a_writer_holds_the_repository(repo, tmp_path):
    with repo.lock("shared"):
        with pytest.raises(FailedPrecondition, match="locked by shared lock"):
            maintenance.prune(repo)
    maintenance.prune(repo)   # the writer is gone: prune runs


class SlowBackend(MemoryBackend):
    """Pack uploads take time, so a writer is caught in the middle of a checkpoint."""

    def save(self, key, data):
        if key.startswith("packs/"):
            time.sleep(0.05)
        super().save(key, data)


def test_prune_with_a_concurrent_writer_loses_nothing(tmp_path):
    backend = SlowBackend.named(uuid.uuid4().hex)   # memory://NAME now opens this backend
    repo = Repository.init(backend.url, "pw", pack_size=1 << 20)
    old = checkpoint(repo, tmp_path, os.urandom(200 * PAGE))
    repo.remove_checkpoint(old.id)
    written: list[Manifest] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            w = Repository.open(backend.url, "pw")
            with w.lock("shared", wait=30):
                written.append(checkpoint(w, tmp_path, os.urandom(800 * PAGE)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    prunes, refused = [], 0
    t = threading.Thread(target=writer)
    t.start()
    while t.is_alive():   # prune keeps trying while the writer works; it must never damage it
        try:
            prunes.append(maintenance.prune(Repository.open(backend.url, "pw")))
        except FailedPrecondition:
            refused += 1
        time.sleep(0.05)
    t.join()
    assert not errors and written
    assert refused > 0   # the two really overlapped
    final = Repository.open(backend.url, "pw")
    maintenance.prune(final)
    assert restorable(final, written[0], tmp_path)
    assert maintenance.check(final, read_data=True).ok


def test_check_names_checkpoints_hit_by_a_missing_pack(repo, tmp_path):
    a = checkpoint(repo, tmp_path, os.urandom(400 * PAGE))
    assert maintenance.check(repo).ok
    victim = next(i.key for i in repo.backend.list("packs/"))
    repo.backend.remove(victim)
    report = maintenance.check(repo)
    assert not report.ok and a.id in report.damaged_checkpoints
    assert any("is missing" in p and a.id in p for p in report.problems)


def test_check_read_data_finds_a_flipped_byte(repo, tmp_path):
    a = checkpoint(repo, tmp_path, os.urandom(100 * PAGE))
    key = next(i.key for i in repo.backend.list("packs/"))
    data = bytearray(repo.backend.load(key))
    data[100] ^= 0x40
    repo.backend.save(key, bytes(data))
    assert maintenance.check(repo).ok                      # structure alone cannot see it
    report = maintenance.check(repo, read_data=True)
    assert not report.ok and a.id in report.damaged_checkpoints
    assert maintenance.check(repo, read_data=True, subset=0.5).packs_read >= 1


def test_stats_shows_new_bytes_of_an_incremental_checkpoint(repo, tmp_path):
    mem = bytearray(os.urandom(1000 * PAGE))
    first = checkpoint(repo, tmp_path, bytes(mem), created="2026-01-01T00:00:00.000Z")
    for p in range(0, 1000, 20):
        mem[p * PAGE + 7] ^= 1
    second = checkpoint(repo, tmp_path, bytes(mem), created="2026-01-02T00:00:00.000Z")
    s1, s2 = maintenance.stats(repo, first.id), maintenance.stats(repo, second.id)
    assert s1["new_bytes"] == s1["unique_bytes"]
    assert s2["new_bytes"] <= 0.06 * s2["logical_bytes"]
    assert s2["new_stored_bytes"] <= 0.07 * s1["stored_bytes"]
    info = maintenance.info(repo)
    assert info["checkpoints"] == 2 and info["dedup_ratio"] > 1.8


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=0, max_size=20000), st.integers(min_value=0, max_value=19999), st.integers(0, 255))
def test_chunker_is_deterministic_and_local(tmp_path_factory, data, where, value):
    params = ChunkerParams("tar-pages", 4096)
    d = tmp_path_factory.mktemp("chunk")
    a, b = d / "a", d / "b"
    a.write_bytes(data)
    first = list(cut_file(str(a), params))
    assert first == list(cut_file(str(a), params)) and b"".join(first) == data
    if not data:
        return
    edited = bytearray(data)
    edited[where % len(data)] = value
    b.write_bytes(bytes(edited))
    second = list(cut_file(str(b), params))
    assert b"".join(second) == bytes(edited)
    assert sum(x != y for x, y in zip(first, second, strict=False)) <= 1   # one byte, one chunk


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=1, max_size=3 * 4096), st.binary(min_size=1, max_size=3000))
def test_tar_pages_stay_aligned_when_an_earlier_member_grows(tmp_path_factory, pages, header):
    params = ChunkerParams("tar-pages", 4096)
    d = tmp_path_factory.mktemp("tar")

    def tar(name: str, first: bytes) -> str:
        with tarfile.open(d / name, "w") as t:
            for member, data in (("config.dump", first), ("pages-1.img", pages)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        return str(d / name)

    one = set(cut_file(tar("1.tar", header), params))
    two = set(cut_file(tar("2.tar", header + b"x" * 700), params))
    page_chunks = {pages[i:i + 4096] for i in range(0, len(pages), 4096)}
    assert page_chunks <= one and page_chunks <= two


def test_prune_after_an_interrupted_prune_keeps_chunks_listed_by_either_index(tmp_path):
    """An old full index and a trimmed one (a prune that crashed before deleting the old) both name
    a pack: chunks that only the full one lists, and that a checkpoint uses, survive the next prune."""
    repo = Repository.init(f"memory://{uuid.uuid4().hex}", None, encrypt=False, pack_size=8 << 20)
    data = os.urandom(200 * PAGE)
    first = checkpoint(repo, tmp_path, data)
    [(pack_id, table)] = [(p, t) for packs in (repo.read_index_file(i.key[6:-5])
                                                for i in repo.backend.list("index/")) for p, t in packs.items()]
    half = len(table["chunks"]) // 2
    trimmed = {"size": table["size"], "blobs": table["blobs"], "ids": table["ids"][:half * 32],
               "chunks": table["chunks"][:half]}
    repo.write_index({pack_id: trimmed})
    second = checkpoint(Repository.open(repo.url, None, repo.backend), tmp_path, data)  # uses every chunk
    repo.remove_checkpoint(first.id)
    maintenance.prune(Repository.open(repo.url, None, repo.backend))
    final = Repository.open(repo.url, None, repo.backend)
    assert restorable(final, second, tmp_path)
    assert maintenance.check(final, read_data=True).ok
