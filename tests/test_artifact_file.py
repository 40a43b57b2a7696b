"""ArtifactFile: a stored artifact read in place, a range at a time, every chunk verified."""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stasis.errors import IntegrityError
from stasis.storage.artifact_file import ArtifactFile
from stasis.storage.repository import Repository

PAGE = 4096


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A tar of 3 MiB of random pages behind a small member, in an encrypted in-memory repository."""
    tmp = tmp_path_factory.mktemp("af")
    path = tmp / "a.tar"
    with tarfile.open(path, "w") as t:
        for name, data in (("config.dump", b"{}" * 700), ("checkpoint/pages-1.img", os.urandom(768 * PAGE)),
                           ("rootfs-diff.tar", b"x" * 5000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)
        repo = Repository.init(f"memory://{uuid.uuid4().hex}", "secret")
    return repo, repo.store_file(str(path)), path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_range_reads_the_stored_bytes(stored, data):
    repo, artifact, plain = stored
    offset = data.draw(st.integers(0, len(plain) + 10))
    n = data.draw(st.integers(0, 3 * PAGE + 7))
    with ArtifactFile(repo, artifact) as f:
        assert f.pread(offset, n) == plain[offset:offset + n]
        f.seek(offset)
        got = f.read(n)
        assert got == plain[offset:offset + n] and f.tell() == offset + len(got)


def test_a_member_lookup_fetches_only_its_blobs(stored):
    repo, artifact, plain = stored
    with ArtifactFile(repo, artifact) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        names = [m.name for m in tar]
        member = tar.getmember("rootfs-diff.tar")
        assert tar.extractfile(member).read() == b"x" * 5000
        assert names == ["config.dump", "checkpoint/pages-1.img", "rootfs-diff.tar"]
        # The headers and the last member: a blob or two at each end, not the 3 MiB of pages between.
        assert 0 < f.fetched < len(plain) // 4


def test_a_damaged_blob_is_refused(stored, tmp_path):
    repo, artifact, _ = stored
    backend = repo.backend
    copy = Repository.open(repo.url, "secret", backend)
    key = next(i.key for i in backend.list("packs/"))
    original = backend.load(key)
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 1
    backend.save(key, bytes(damaged))
    try:
        with ArtifactFile(copy, artifact) as f, pytest.raises(IntegrityError):
            f.pread(0, artifact.size)
    finally:
        backend.save(key, original)


def test_a_lost_chunk_names_the_problem(stored):
    repo, artifact, _ = stored
    copy = Repository.open(repo.url, "secret", repo.backend)
    with ArtifactFile(copy, artifact) as f:
        copy.index.clear()
        with pytest.raises(IntegrityError, match="in no index"):
            f.pread(0, 10)
