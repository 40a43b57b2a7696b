"""forensics.image_files: an image's paths from its docker-archive, whiteouts applied as overlayfs does."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from stasis.forensics.archive import ArchiveError
from stasis.forensics.image_files import image_paths


def tar_bytes(entries: list[tuple[str, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def docker_archive(layers: list[list[tuple[str, bytes | None]]], manifest=None) -> bytes:
    names = [f"{i:064x}.tar" for i in range(len(layers))]
    doc = manifest if manifest is not None else [{"Config": "c.json", "RepoTags": ["x:1"], "Layers": names}]
    return tar_bytes([("manifest.json", json.dumps(doc).encode()),
                      *((n, tar_bytes(layer)) for n, layer in zip(names, layers, strict=True))])


def paths_of(archive: bytes) -> set[str]:
    return image_paths(lambda offset, n: archive[offset:offset + n], len(archive))


def test_layers_apply_in_order_with_whiteouts_and_opaque_folders():
    base = [("bin", None), ("bin/sh", b"x"), ("bin/ls", b"y"), ("etc", None), ("etc/a", b"1"), ("etc/b/c", b"2"),
            ("opt/keep/x", b"3")]
    top = [("bin/.wh.ls", b""), ("etc/.wh..wh..opq", b""), ("etc/new", b"4"), ("./opt/keep/y", b"5")]
    assert paths_of(docker_archive([base, top])) == {
        "/bin", "/bin/sh", "/etc", "/etc/new", "/opt/keep/x", "/opt/keep/y"}


def test_a_whiteout_removes_a_whole_folder():
    assert paths_of(docker_archive([[("a/b/c", b"1"), ("a/d", b"2")], [(".wh.a", b"")]])) == set()


@pytest.mark.parametrize("archive,message", [
    (tar_bytes([("x", b"1")]), "no \\(small\\) manifest.json"),
    (tar_bytes([("manifest.json", b"{}")]), "does not list its layers"),
    (docker_archive([], manifest=[{"Layers": ["missing.tar"]}]), "lacks the layer"),
    (b"\0" * 100 + b"garbage" * 200, "not a readable tar|no \\(small\\) manifest.json"),
])
def test_malformed_archives_are_one_line_errors(archive, message):
    with pytest.raises(ArchiveError, match=message) as err:
        paths_of(archive)
    assert "\n" not in str(err.value)
