"""The repository format (v2): chunking, dedup, compression, encryption, verification, locks.

Runs on the in-memory backend; the same code runs on S3 and a local folder in test_storage_e2e.
"""

from __future__ import annotations

import io
import os
import tarfile
import uuid

import pytest

from stasis.errors import FailedPrecondition, IntegrityError, InvalidArgument, NotFound, PermissionDenied
from stasis.storage.manifest import ContainerRef, Manifest
from stasis.storage.repository import Repository, new_checkpoint_id, now_rfc3339

PAGE = 4096


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)


def url() -> str:
    return f"memory://{uuid.uuid4().hex}"


@pytest.fixture(params=["encrypted", "plain"])
def repo(request):
    encrypt = request.param == "encrypted"
    return Repository.init(url(), "secret" if encrypt else None, encrypt=encrypt)


def make_tar(path, pages: bytes, header_len: int = 1000) -> str:
    with tarfile.open(path, "w") as t:
        for name, data in (("config.dump", b"c" * header_len), ("pages-1.img", pages)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def pages(n: int, compressible: bool = False) -> bytearray:
    if compressible:
        return bytearray(b"".join(bytes([i % 251]) * PAGE for i in range(n)))
    return bytearray(os.urandom(n * PAGE))


def packed_bytes(repo) -> int:
    return sum(i.size for i in repo.backend.list("packs/"))


def roundtrip(repo, artifact, tmp_path) -> bytes:
    out = tmp_path / f"out-{uuid.uuid4().hex}"
    repo.fetch_file(artifact, str(out))
    return out.read_bytes()


def manifest(artifact, ident=None) -> Manifest:
    return Manifest(id=ident or new_checkpoint_id(), created=now_rfc3339(), host="host-a", runtime="podman",
                    runtime_version="4.3.1", criu_version="4.1.1",
                    container=ContainerRef("c" * 64, "web", "localhost/x:1", "d" * 64),
                    leave_running=False, checkpoint=artifact, image=None, timings={"dump": 1.5},
                    criu_stats={"frozen_time": 1200})


@pytest.mark.parametrize("size", [0, 1, PAGE - 1, PAGE, 5 * PAGE + 17, 300 * PAGE])
def test_any_file_roundtrips(repo, tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    artifact = repo.store_file(str(tmp_path / "in"))
    assert artifact.size == size
    assert roundtrip(repo, artifact, tmp_path) == data


def test_tar_roundtrip_and_reopen(repo, tmp_path):
    path = make_tar(tmp_path / "a.tar", bytes(pages(200)))
    artifact = repo.store_file(path)
    again = Repository.open(repo.url, "secret" if repo.encrypted else None, repo.backend)
    assert roundtrip(again, artifact, tmp_path) == open(path, "rb").read()


def test_second_checkpoint_stores_only_changed_pages(repo, tmp_path):
    mem = pages(1000)
    first = repo.store_file(make_tar(tmp_path / "1.tar", bytes(mem)))
    stored_first = packed_bytes(repo)
    for p in range(0, 1000, 20):      # 5 % of the pages change
        mem[p * PAGE] ^= 0xFF
    # A member before the pages changes size: the pages must stay aligned to chunks anyway.
    second = repo.store_file(make_tar(tmp_path / "2.tar", bytes(mem), header_len=1700))
    new = packed_bytes(repo) - stored_first
    assert new < 0.08 * stored_first, (new, stored_first)
    assert roundtrip(repo, second, tmp_path) == open(tmp_path / "2.tar", "rb").read()
    assert roundtrip(repo, first, tmp_path) == open(tmp_path / "1.tar", "rb").read()


def test_compressible_data_is_compressed(repo, tmp_path):
    path = make_tar(tmp_path / "c.tar", bytes(pages(500, compressible=True)))
    repo.store_file(path)
    assert packed_bytes(repo) < os.path.getsize(path) / 20


def test_encrypted_repository_hides_plaintext(tmp_path):
    repo = Repository.init(url(), "secret")
    secret = b"TOP-SECRET-TOKEN-" * 300
    (tmp_path / "s").write_bytes(secret)
    art = repo.store_file(str(tmp_path / "s"))
    repo.write_manifest(manifest(art))
    everything = b"".join(repo.backend.objects.values())
    assert b"TOP-SECRET" not in everything and b"web" not in everything and b"localhost/x" not in everything


def test_wrong_password_and_missing_password_are_refused():
    repo = Repository.init(url(), "right")
    with pytest.raises(PermissionDenied, match="wrong password"):
        Repository.open(repo.url, "wrong", repo.backend)
    with pytest.raises(FailedPrecondition, match="STASIS_PASSWORD"):
        Repository.open(repo.url, None, repo.backend)


def test_several_passwords_open_the_same_repository(tmp_path):
    repo = Repository.init(url(), "first")
    key = repo.add_key("first", "second")
    assert len(repo.key_ids()) == 2
    Repository.open(repo.url, "second", repo.backend)
    repo.remove_key(key)
    with pytest.raises(PermissionDenied):
        Repository.open(repo.url, "second", repo.backend)
    with pytest.raises(FailedPrecondition, match="last key"):
        repo.remove_key(repo.key_ids()[0])


def test_downgrade_to_plaintext_is_refused():
    repo = Repository.init(url(), "pw")
    plain = Repository.init(url(), None, encrypt=False)
    repo.backend.save("config", plain.backend.load("config"))   # attacker swaps the config
    with pytest.raises(IntegrityError, match="key files exist"):
        Repository.open(repo.url, "pw", repo.backend)


@pytest.mark.parametrize("target", ["pack", "index", "manifest"])
def test_tampering_with_any_object_is_detected(repo, tmp_path, target):
    path = make_tar(tmp_path / "t.tar", bytes(pages(50)))
    art = repo.store_file(path)
    m = manifest(art)
    repo.write_manifest(m)
    prefix = {"pack": "packs/", "index": "index/", "manifest": "checkpoints/"}[target]
    key = next(i.key for i in repo.backend.list(prefix))
    data = bytearray(repo.backend.load(key))
    data[len(data) // 3] ^= 0x01
    repo.backend.save(key, bytes(data))
    with pytest.raises(IntegrityError):
        fresh = Repository.open(repo.url, "secret" if repo.encrypted else None, repo.backend)
        fresh.fetch_file(fresh.read_manifest(m.id).checkpoint, str(tmp_path / "out"))


def test_missing_pack_names_the_problem(repo, tmp_path):
    art = repo.store_file(make_tar(tmp_path / "t.tar", bytes(pages(20))))
    repo.backend.remove(next(i.key for i in repo.backend.list("packs/")))
    with pytest.raises(IntegrityError, match="missing"):
        repo.fetch_file(art, str(tmp_path / "out"))


def test_manifest_is_the_commit_point(repo, tmp_path):
    art = repo.store_file(make_tar(tmp_path / "t.tar", bytes(pages(20))))
    assert repo.checkpoint_ids() == []
    m = manifest(art, "0123456789abcdef")
    repo.write_manifest(m)
    assert repo.read_manifest("01234567") == m


def test_manifest_naming_unstored_chunks_is_not_committed(repo, tmp_path):
    art = repo.store_file(make_tar(tmp_path / "t.tar", bytes(pages(5))))
    other = Repository.init(url(), "secret" if repo.encrypted else None, encrypt=repo.encrypted)
    with pytest.raises(IntegrityError, match="not stored"):
        other.write_manifest(manifest(art))


def test_prefix_resolution(repo, tmp_path):
    art = repo.store_file(make_tar(tmp_path / "t.tar", b"x" * 10))
    for ident in ("0123456789abcdef", "0123ffffffffffff"):
        repo.write_manifest(manifest(art, ident))
    with pytest.raises(InvalidArgument, match="ambiguous"):
        repo.resolve("0123")
    with pytest.raises(NotFound):
        repo.resolve("fedc")
    with pytest.raises(InvalidArgument, match="malformed"):
        repo.resolve("../../etc")


def test_image_hint_is_reused_only_when_intact(repo, tmp_path):
    image_id = "e" * 64
    art = repo.store_file(make_tar(tmp_path / "img.tar", bytes(pages(30))))
    repo.remember_image(image_id, art)
    assert repo.image_artifact(image_id) == art
    assert not any(image_id in i.key for i in repo.backend.list("images/"))   # names are keyed hashes
    for info in list(repo.backend.list("packs/")):
        repo.backend.remove(info.key)
    for info in list(repo.backend.list("index/")):
        repo.backend.remove(info.key)
    with repo.lock("shared"):   # as every writer does: the lock refreshes the index
        assert repo.image_artifact(image_id) is None


def test_open_refuses_missing_foreign_and_future_repositories(tmp_path):
    with pytest.raises(FailedPrecondition, match="stasis repo init"):
        Repository.open(f"file://{tmp_path}/none")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config").write_text('{"format": "restic"}')
    with pytest.raises(IntegrityError):
        Repository.open(f"file://{tmp_path}/foreign")
    (tmp_path / "future").mkdir()
    (tmp_path / "future" / "config").write_text('{"format": "stasis-repository", "version": 99}')
    with pytest.raises(FailedPrecondition, match="upgrade stasis"):
        Repository.open(f"file://{tmp_path}/future")


def test_init_refuses_an_existing_repository():
    repo = Repository.init(url(), "pw")
    with pytest.raises(FailedPrecondition, match="already holds"):
        Repository.init(repo.url, "pw")


def test_pack_deleted_by_prune_is_seen_by_a_long_lived_reader(repo, tmp_path):
    """A reader's cached index must follow a prune (refresh reloads when an index file vanished)."""
    from stasis.storage import maintenance

    pw = "secret" if repo.encrypted else None
    keeper = repo.store_file(make_tar(tmp_path / "k.tar", bytes(pages(40))))
    repo.write_manifest(manifest(keeper))
    doomed = repo.store_file(make_tar(tmp_path / "d.tar", bytes(pages(40))))
    reader = Repository.open(repo.url, pw, repo.backend)
    maintenance.prune(Repository.open(repo.url, pw, repo.backend))
    with reader.lock("shared"):
        assert all(i in reader.index for i, _ in keeper.chunks())
        only_doomed = {i for i, _ in doomed.chunks()} - {i for i, _ in keeper.chunks()}
        assert only_doomed and not any(i in reader.index for i in only_doomed)


def test_plaintext_repository_swapped_in_for_an_encrypted_one_is_refused():
    """An attacker who can clear the bucket and write a plaintext repository gets refused by every
    reader that holds a password (it expects encryption)."""
    repo = Repository.init(url(), None, encrypt=False)
    with pytest.raises(IntegrityError, match="a password was given"):
        Repository.open(repo.url, "secret", repo.backend)


def test_a_key_file_from_an_interrupted_init_does_not_lock_users_out():
    from stasis.storage import keys

    repo = Repository.init(url(), "pw")
    stray = keys.wrap(keys.MasterKey.generate(), "pw", now_rfc3339())   # same password, other master key
    repo.backend.save("keys/00000000000000000000000000000000.json", stray)
    assert Repository.open(repo.url, "pw", repo.backend).config.id == repo.config.id


@pytest.mark.parametrize("doc", [
    b'{"kdf": "scrypt", "n": Infinity, "r": 8, "p": 1, "salt": "", "data": ""}',
    b'{"kdf": "scrypt", "n": 1048576, "r": 32, "p": 16, "salt": "AAAAAAAAAAAAAAAAAAAAAA==", "data": ""}',
    b"[" * 100000,
])
def test_hostile_key_files_are_skipped_quickly(doc):
    repo = Repository.init(url(), "pw")
    repo.backend.save("keys/00000000000000000000000000000000.json", doc)
    assert Repository.open(repo.url, "pw", repo.backend)


def test_a_planted_index_file_does_not_make_the_repository_unreadable(tmp_path):
    from stasis.storage.crypto import content_hash

    repo = Repository.init(url(), "pw")
    art = repo.store_file(make_tar(tmp_path / "t.tar", bytes(pages(10))))
    junk = b"garbage"
    repo.backend.save(f"index/{content_hash(junk)}.json", junk)
    again = Repository.open(repo.url, "pw", repo.backend)
    assert roundtrip(again, art, tmp_path) == open(tmp_path / "t.tar", "rb").read()


def test_init_refuses_a_non_empty_location():
    repo = Repository.init(url(), "pw")
    repo.backend.remove("config")
    with pytest.raises(FailedPrecondition, match="not empty"):
        Repository.init(repo.url, "pw")


def test_a_writer_that_lost_its_lock_commits_nothing(tmp_path, monkeypatch):
    from stasis.storage import locks

    repo = Repository.init(url(), "pw")
    lock = repo.lock("shared")
    repo.backend.remove(lock.key)   # as if a prune judged it stale and went ahead
    with pytest.raises(FailedPrecondition, match="lost the repository lock"):
        repo.store_file(make_tar(tmp_path / "t.tar", bytes(pages(10))), lock=lock)
    assert list(repo.backend.list("index/")) == []
    lock.release()
    assert locks.is_stale({"refreshed": 0}) and locks.is_stale({"refreshed": "x"})
    assert locks.is_stale({"refreshed": 1e308 * 10}) is False or True   # never raises
    assert locks.is_stale({"refreshed": __import__("time").time(), "host": __import__("socket").gethostname(),
                           "pid": 2 ** 70}) is False
