"""The repository format over the in-memory backend (the same code runs on S3 in the e2e tests)."""

from __future__ import annotations

import hashlib
import os

import pytest

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from stasis.storage.manifest import ContainerRef, Manifest
from stasis.storage.memory import MemoryBackend
from stasis.storage.repository import Repository, new_checkpoint_id, now_rfc3339

CHUNK = 64 * 1024


@pytest.fixture
def repo():
    backend = MemoryBackend()
    backend.save("config", b'{"format": "stasis-repository", "version": 1, "chunk_size": 65536}')
    return Repository.open("memory://test", backend)


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def manifest_for(repo, artifact, ident=None) -> Manifest:
    return Manifest(id=ident or new_checkpoint_id(), created=now_rfc3339(), host="host-a", runtime="podman",
                    runtime_version="4.3.1", criu_version="4.1.1",
                    container=ContainerRef("c" * 64, "web", "localhost/x:1", "d" * 64),
                    leave_running=False, checkpoint=artifact, image=None, timings={"dump": 1.5},
                    criu_stats={"frozen_time": 1200})


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17])
def test_store_and_fetch_roundtrip(repo, tmp_path, size):
    data = os.urandom(size)
    artifact = repo.store_file(write(tmp_path, "in", data))
    assert artifact.size == size
    assert all(c.size <= CHUNK for c in artifact.chunks)
    out = tmp_path / "out"
    repo.fetch_file(artifact, str(out))
    assert out.read_bytes() == data


def test_objects_are_named_by_their_sha256_and_stored_once(repo, tmp_path):
    block = os.urandom(CHUNK)
    artifact = repo.store_file(write(tmp_path, "in", block * 3))
    assert len({c.sha256 for c in artifact.chunks}) == 1
    assert artifact.chunks[0].sha256 == hashlib.sha256(block).hexdigest()
    objects = [i for i in repo.backend.list("objects/")]
    assert len(objects) == 1


def test_progress_reaches_total(repo, tmp_path):
    seen = []
    repo.store_file(write(tmp_path, "in", os.urandom(3 * CHUNK)), progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (3 * CHUNK, 3 * CHUNK)


def test_corrupted_object_is_refused(repo, tmp_path):
    artifact = repo.store_file(write(tmp_path, "in", os.urandom(2 * CHUNK)))
    key = repo.object_key(artifact.chunks[1].sha256)
    data = bytearray(repo.backend.load(key))
    data[0] ^= 1
    repo.backend.save(key, bytes(data))
    with pytest.raises(IntegrityError, match="corrupted"):
        repo.fetch_file(artifact, str(tmp_path / "out"))


def test_missing_object_is_refused(repo, tmp_path):
    artifact = repo.store_file(write(tmp_path, "in", os.urandom(CHUNK)))
    repo.backend.remove(repo.object_key(artifact.chunks[0].sha256))
    with pytest.raises(IntegrityError, match="missing"):
        repo.fetch_file(artifact, str(tmp_path / "out"))


def test_manifest_roundtrip_and_prefix_resolution(repo, tmp_path):
    artifact = repo.store_file(write(tmp_path, "in", b"abc"))
    m = manifest_for(repo, artifact, "0123456789abcdef")
    repo.write_manifest(m)
    repo.write_manifest(manifest_for(repo, artifact, "0123ffffffffffff"))
    assert repo.read_manifest("0123456789abcdef") == m
    assert repo.read_manifest("012345").id == m.id
    with pytest.raises(InvalidArgument, match="ambiguous"):
        repo.resolve("0123")
    with pytest.raises(NotFound):
        repo.resolve("fedc")
    with pytest.raises(InvalidArgument, match="malformed"):
        repo.resolve("../../etc")
    assert sorted(repo.checkpoint_ids()) == ["0123456789abcdef", "0123ffffffffffff"]


def test_a_checkpoint_is_invisible_until_its_manifest_is_written(repo, tmp_path):
    repo.store_file(write(tmp_path, "in", os.urandom(CHUNK)))
    assert repo.checkpoint_ids() == []


def test_manifest_that_lies_about_its_id_is_refused(repo, tmp_path):
    artifact = repo.store_file(write(tmp_path, "in", b"abc"))
    m = manifest_for(repo, artifact, "0123456789abcdef")
    repo.backend.save("checkpoints/aaaaaaaaaaaaaaaa.json", m.to_bytes())
    with pytest.raises(IntegrityError, match="names itself"):
        repo.read_manifest("aaaaaaaaaaaaaaaa")


def test_image_artifact_is_reused_only_when_intact(repo, tmp_path):
    image_id = "e" * 64
    artifact = repo.store_file(write(tmp_path, "img", os.urandom(CHUNK + 5)))
    repo.remember_image(image_id, artifact)
    assert repo.image_artifact(image_id) == artifact
    repo.backend.remove(repo.object_key(artifact.chunks[0].sha256))
    assert repo.image_artifact(image_id) is None
    assert repo.image_artifact("not-an-id") is None


def test_open_refuses_missing_or_foreign_repositories(tmp_path):
    with pytest.raises(FailedPrecondition, match="stasis repo init"):
        Repository.open(f"file://{tmp_path}/none")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config").write_text('{"format": "restic"}')
    with pytest.raises(IntegrityError):
        Repository.open(f"file://{tmp_path}/foreign")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "config").write_text(
        '{"format": "stasis-repository", "version": 99, "chunk_size": 65536}')
    with pytest.raises(FailedPrecondition, match="upgrade stasis"):
        Repository.open(f"file://{tmp_path}/future")


def test_init_is_idempotent(tmp_path):
    a = Repository.init(f"file://{tmp_path}/r")
    config = (tmp_path / "r" / "config").read_bytes()
    b = Repository.init(f"file://{tmp_path}/r")
    assert (tmp_path / "r" / "config").read_bytes() == config
    assert a.chunk_size == b.chunk_size
