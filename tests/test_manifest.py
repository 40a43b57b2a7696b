"""Manifests are read back from storage: whatever bytes arrive, parsing gives a Manifest or a clear
IntegrityError, never a crash or an object naming a bad key."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stasis.errors import IntegrityError
import zstandard

from stasis.storage.manifest import Artifact, ContainerRef, Manifest

GOOD = Manifest(
    id="0123456789abcdef", created="2026-11-29T10:00:00.000Z", host="host-a", runtime="podman",
    runtime_version="4.3.1", criu_version="4.1.1",
    container=ContainerRef("c" * 64, "web", "localhost/x:1", "d" * 64, {"app": "db"}),
    leave_running=True, checkpoint=Artifact.build([(b"a" * 32, 1), (b"b" * 32, 2)]),
    image=Artifact.build([(b"f" * 32, 1)]), timings={"dump": 1.25}, criu_stats={"frozen_time": 10})


def test_roundtrip():
    assert Manifest.from_bytes(GOOD.to_bytes()) == GOOD


def raw(doc) -> bytes:
    return zstandard.ZstdCompressor().compress(json.dumps(doc).encode())


def mutate(path: list, value):
    doc = json.loads(zstandard.ZstdDecompressor().decompress(GOOD.to_bytes()))
    target = doc
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return raw(doc)


@pytest.mark.parametrize("path,value,problem", [
    (["version"], 3, "upgrade stasis"),
    (["format"], "other", "format"),
    (["id"], "../../etc/passwd", "malformed"),
    (["artifacts", "checkpoint", "ids"], "../../../etc/shadow", "malformed"),
    (["artifacts", "checkpoint", "sizes", 0, 0], -5, "non-negative"),
    (["artifacts", "checkpoint", "sizes", 0, 1], 7, "do not match the ids"),
    (["artifacts", "checkpoint", "size"], 999, "sum of its chunks"),
    (["container", "image_id"], "-h", "64-hex"),
    (["container", "labels"], {"a": 1}, "strings"),
    (["timings", "dump"], "slow", "number"),
    (["container"], None, "object"),
])
def test_damaged_fields_are_named(path, value, problem):
    with pytest.raises(IntegrityError, match=problem):
        Manifest.from_bytes(mutate(path, value))


def test_not_json_is_damage():
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Manifest.from_bytes(b"\xff\x00garbage")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        Manifest.from_bytes(raw("not json")[:-3])


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                                    children, max_size=4),
                    max_leaves=20))
def test_arbitrary_json_never_crashes(doc):
    try:
        Manifest.from_bytes(raw(doc))
    except IntegrityError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(raw):
    try:
        Manifest.from_bytes(raw)
    except IntegrityError:
        pass
