"""Post-copy plumbing below the real e2e test: the source's relay end against a stand-in for CRIU's
page server (a real loopback socket), and the import archive rebuilt from an overlay folder."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import tarfile

import pytest

from stasis.agent import pages, podman_archive
from stasis.errors import IntegrityError
from stasis.proto.v1 import stasis_pb2 as pb


class FakePageServer:
    """Records what CRIU would see, in order: bytes, then EOF (or not)."""

    def __init__(self):
        self.events: list[str] = []
        self.received = b""

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        writer.write(b"pagemap")   # CRIU answers the daemon's first request
        await writer.drain()
        while data := await reader.read(1 << 16):
            self.received += data
        self.events.append("eof")
        writer.close()


async def _requests(*msgs: pb.PageBytes, fail: bool = False):
    for m in msgs:
        await asyncio.sleep(0.01)
        yield m
    if fail:
        raise ConnectionResetError("peer agent gone")


async def _relay(server: FakePageServer, port: int, requests) -> list[bytes]:
    async def abort() -> bool:
        server.events.append("abort")
        return True
    return [m.data async for m in pages.serve_source(requests, port, abort)]


async def test_an_explicit_end_is_the_only_eof_criu_sees():
    server = FakePageServer()
    port = await server.start()
    got = await _relay(server, port, _requests(pb.PageBytes(data=b"get 1"), pb.PageBytes(end=True)))
    assert got == [b"pagemap"] and server.received == b"get 1"
    assert server.events == ["eof"]   # not aborted: the source may finish (and stop) its container


async def test_a_broken_stream_aborts_the_dump_before_criu_reads_eof():
    server = FakePageServer()
    port = await server.start()
    with pytest.raises(ConnectionResetError):
        await _relay(server, port, _requests(pb.PageBytes(data=b"get 1"), fail=True))
    await asyncio.sleep(0.05)
    # The abort (which resumes the source) comes first; EOF alone would mean "all pages taken".
    assert server.events == ["abort", "eof"]


async def test_a_stream_that_ends_without_end_aborts_too():
    server = FakePageServer()
    port = await server.start()
    with pytest.raises(IntegrityError, match="closed the memory relay"):
        await _relay(server, port, _requests(pb.PageBytes(data=b"get 1")))
    await asyncio.sleep(0.05)
    assert server.events == ["abort", "eof"]


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay whiteouts are device nodes: root only")
def test_the_import_archive_is_podmans_layout(tmp_path):
    static, upper, vol = tmp_path / "userdata", tmp_path / "upper", tmp_path / "vol"
    for d in (static / "checkpoint", static / "shm", upper / "data" / "new", upper / "etc", upper / "bin", vol):
        d.mkdir(parents=True)
    (static / "checkpoint" / "core-1.img").write_bytes(b"core")
    (static / "config.dump").write_text("{}")
    (static / "spec.dump").write_text("{}")
    (static / "shm" / "seg").write_bytes(b"shm")
    (upper / "data" / "new" / "log").write_text("line\n")
    (upper / "etc" / "hosts").write_text("managed by podman")
    os.mknod(upper / "bin" / "ls", stat.S_IFCHR | 0o600, os.makedev(0, 0))   # deleted in the container
    (vol / "f").write_text("volume data")
    archive = tmp_path / "out.tar"
    podman_archive.write(str(archive), str(static), str(upper), {"v1": str(vol)})

    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        assert {"checkpoint/core-1.img", "config.dump", "spec.dump", "network.status", "devshm-checkpoint.tar",
                "rootfs-diff.tar", "deleted.files", "volumes/v1.tar"} <= names
        assert json.load(tar.extractfile("deleted.files")) == ["/bin/ls"]
        with tarfile.open(fileobj=tar.extractfile("rootfs-diff.tar")) as diff:
            changed = set(diff.getnames())
        assert "data/new/log" in changed and "etc/hosts" not in changed and "bin/ls" not in changed
        with tarfile.open(fileobj=tar.extractfile("volumes/v1.tar")) as v:
            assert v.extractfile("f").read() == b"volume data"
        with tarfile.open(fileobj=tar.extractfile("devshm-checkpoint.tar")) as shm:
            assert shm.getnames() == ["seg"]


def test_dumps_taken_early_survive_podman_deleting_them(tmp_path):
    """podman deletes config.dump, spec.dump and stats-dump once its own export is done: the archive
    is built from the copies read when CRIU finished, with podman's network.status as it recorded it."""
    static, upper = tmp_path / "userdata", tmp_path / "upper"
    (static / "checkpoint").mkdir(parents=True)
    upper.mkdir()
    (static / "checkpoint" / "core-1.img").write_bytes(b"core")
    for name, data in (("config.dump", b'{"id": 1}'), ("spec.dump", b'{"oci": 1}'), ("stats-dump", b"stats")):
        (static / name).write_bytes(data)
    (static / "network.status").write_bytes(b'{"eth0": {}}')
    dumps = podman_archive.read_dumps(str(static))
    for name in ("config.dump", "spec.dump", "stats-dump"):
        (static / name).unlink()
    archive = tmp_path / "out.tar"
    podman_archive.write(str(archive), str(static), str(upper), {}, dumps)
    with tarfile.open(archive) as tar:
        got = {n: tar.extractfile(n).read() for n in ("config.dump", "spec.dump", "stats-dump", "network.status")}
    assert got == {"config.dump": b'{"id": 1}', "spec.dump": b'{"oci": 1}', "stats-dump": b"stats",
                   "network.status": b'{"eth0": {}}'}
    with pytest.raises(FileNotFoundError):     # without podman's config the archive cannot be imported
        podman_archive.read_dumps(str(static))


def test_pages_set_aside_go_back_into_the_image_folder_of_the_archive(tmp_path):
    """Stop-and-copy: CRIU's images first (pages from the folder the runc wrapper moved them to), podman's
    state after it; every member byte for byte, in a tar that GNU tar and Python both read."""
    static, upper, aside = tmp_path / "userdata", tmp_path / "upper", tmp_path / "userdata" / "stasis-pages"
    for d in (static / "checkpoint", upper, aside):
        d.mkdir(parents=True, exist_ok=True)
    (static / "checkpoint" / "pagemap-1.img").write_bytes(b"map")
    (static / "checkpoint" / "core-1.img").write_bytes(b"c" * 513)
    pages = os.urandom(3 << 20) + b"tail"
    (aside / "pages-1.img").write_bytes(pages)
    (aside / "unrelated").write_bytes(b"not a page")
    shm = tmp_path / "devshm.tar"
    with tarfile.open(shm, "w") as t:
        t.addfile(tarfile.TarInfo("empty"))
    archive = tmp_path / "out.tar"
    writer = podman_archive.ArchiveWriter(str(archive))
    writer.add_images(str(static / "checkpoint"))
    writer.add_pages(str(aside))
    writer.add_state(str(static), str(upper), {}, {"config.dump": b"{}", "spec.dump": b"{}"}, str(shm))
    writer.close()

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert names[:4] == ["checkpoint", "checkpoint/core-1.img", "checkpoint/pagemap-1.img",
                             "checkpoint/pages-1.img"]
        assert tar.extractfile("checkpoint/pages-1.img").read() == pages
        assert tar.extractfile("checkpoint/core-1.img").read() == b"c" * 513
        assert tar.extractfile("devshm-checkpoint.tar").read() == shm.read_bytes()
        assert "checkpoint/unrelated" not in names and {"config.dump", "rootfs-diff.tar"} <= set(names)
    listed = subprocess.run(["tar", "-tf", str(archive)], capture_output=True, text=True, check=True).stdout.split()
    assert listed[:4] == ["checkpoint/", "checkpoint/core-1.img", "checkpoint/pagemap-1.img", "checkpoint/pages-1.img"]
