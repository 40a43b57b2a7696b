"""One conformance suite for every Backend: in-memory, local folder, and S3 on a real SeaweedFS."""

from __future__ import annotations

import os
import uuid

import pytest

from stasis.errors import InvalidArgument
from stasis.storage.backend import ObjectNotFound, check_key, open_backend
from stasis.storage.local import LocalBackend
from stasis.storage.memory import MemoryBackend
from stasis.storage.s3 import MULTIPART_THRESHOLD, S3Backend


@pytest.fixture(params=["memory", "local", "s3"])
def backend(request, tmp_path):
    if request.param == "memory":
        return MemoryBackend(uuid.uuid4().hex)
    if request.param == "local":
        return LocalBackend(str(tmp_path / "repo"))
    request.getfixturevalue("s3_env")
    b = S3Backend(f"conf-{uuid.uuid4().hex[:10]}", "some/prefix")
    b.ensure_bucket()
    return b


def test_save_load_stat_roundtrip(backend):
    backend.save("objects/ab/abc", b"hello world")
    assert backend.load("objects/ab/abc") == b"hello world"
    assert backend.stat("objects/ab/abc").size == 11
    assert backend.exists("objects/ab/abc")


def test_load_with_offset_and_length(backend):
    backend.save("k", bytes(range(256)))
    assert backend.load("k", 10, 5) == bytes(range(10, 15))
    assert backend.load("k", 250) == bytes(range(250, 256))
    assert backend.load("k", 0, 0) == b""


def test_replace_is_whole(backend):
    backend.save("config", b"first version")
    backend.save("config", b"second")
    assert backend.load("config") == b"second"


def test_missing_keys_raise_not_found(backend):
    for op in (lambda: backend.load("nope"), lambda: backend.stat("nope"), lambda: backend.remove("nope")):
        with pytest.raises(ObjectNotFound):
            op()
    assert not backend.exists("nope")


def test_list_by_prefix_and_remove(backend):
    for key in ("checkpoints/a.json", "checkpoints/b.json", "objects/00/x"):
        backend.save(key, key.encode())
    assert sorted(i.key for i in backend.list("checkpoints/")) == ["checkpoints/a.json", "checkpoints/b.json"]
    assert {i.key for i in backend.list()} >= {"checkpoints/a.json", "objects/00/x"}
    backend.remove("checkpoints/a.json")
    assert [i.key for i in backend.list("checkpoints/")] == ["checkpoints/b.json"]


def test_large_object_survives_multipart(backend):
    data = os.urandom(MULTIPART_THRESHOLD + 12345)
    backend.save("objects/big", data)
    assert backend.stat("objects/big").size == len(data)
    assert backend.load("objects/big") == data


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a/../../b", "", "a//b", "with space", "a/.hidden/.."])
def test_hostile_keys_are_refused(backend, key):
    with pytest.raises(InvalidArgument):
        backend.save(key, b"x")
    with pytest.raises(InvalidArgument):
        check_key(key)


def test_local_backend_leaves_no_temp_files(tmp_path):
    b = LocalBackend(str(tmp_path))
    b.save("a/b", b"data")
    assert sorted(os.listdir(tmp_path / "a")) == ["b"]
    assert oct(os.stat(tmp_path / "a").st_mode & 0o777) == "0o700"  # checkpoints hold secrets


def test_open_backend_by_url(tmp_path):
    assert isinstance(open_backend(f"file://{tmp_path}/r"), LocalBackend)
    assert isinstance(open_backend("s3://bucket/prefix"), S3Backend)
    with pytest.raises(InvalidArgument, match="file:///path or s3://bucket/prefix"):
        open_backend("ftp://x")


def test_s3_unreachable_endpoint_is_one_clear_error(monkeypatch):
    from stasis.errors import Unavailable
    from stasis.testbed.ports import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("STASIS_S3_ATTEMPTS", "1")
    with pytest.raises(Unavailable, match="unreachable.*AWS_ENDPOINT_URL"):
        S3Backend("bucket").load("k")


def test_s3_missing_bucket_names_the_fix(s3_env):
    from stasis.errors import FailedPrecondition

    with pytest.raises(FailedPrecondition, match="stasis repo init"):
        S3Backend(f"absent-{uuid.uuid4().hex[:8]}").save("k", b"x")


def test_only_transient_s3_errors_are_retried():
    import botocore.exceptions

    from stasis.storage.s3 import _transient

    def client_error(code: str, status: int):
        return botocore.exceptions.ClientError({"Error": {"Code": code},
                                                "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    assert _transient(client_error("SlowDown", 503))
    assert _transient(client_error("InternalError", 500))
    assert _transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not _transient(client_error("AccessDenied", 403))
    assert not _transient(client_error("NoSuchKey", 404))
    assert not _transient(ValueError("bug"))


def test_transient_failures_are_retried_then_succeed(monkeypatch):
    import botocore.exceptions

    calls = []

    class Flaky:
        def put_object(self, **kwargs):
            calls.append(kwargs["Key"])
            if len(calls) < 3:
                raise botocore.exceptions.ClientError({"Error": {"Code": "SlowDown"},
                                                       "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")

    S3Backend("b", client=Flaky()).save("k", b"x")
    assert calls == ["k", "k", "k"]
