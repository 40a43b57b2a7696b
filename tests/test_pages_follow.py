"""Memory sent while CRIU writes it: page files that grow in any steps, followed by the source and
split by the destination, arrive whole and byte for byte; nothing but pages leaves the archive."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import time
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stasis.agent import podman_archive
from stasis.agent.podman import PodmanRuntime
from stasis.agent.podman_archive import ArchiveWriter, PagesFollower
from stasis.agent.spliced_archive import SplicedReader
from stasis.agent.tar_split import PagesSplitter, join_pages

PART = 1000   # bytes, instead of MiB: many parts from small files

# A step of CRIU's: (page file number, bytes it appends); then whether the follower looks.
steps_strategy = st.lists(st.tuples(st.integers(1, 3), st.integers(0, 2600), st.booleans()), max_size=12)


def _dump(folder: str, steps, moved: set[int], late: bool) -> tuple[str, dict[str, bytes]]:
    """Write page files as CRIU would, with the follower looking in between; the wrapper then moves
    the files in `moved` aside; a `late` file appears after the last look. Returns the archive."""
    images, aside = os.path.join(folder, "checkpoint"), os.path.join(folder, "stasis-pages")
    os.makedirs(images)
    archive = os.path.join(folder, "checkpoint.tar")
    writer = ArchiveWriter(archive, references=True)
    follower = PagesFollower(writer, images, os.path.join(aside, "streamed"))
    written: dict[str, bytearray] = {}
    for number, size, look in steps:
        name = f"pages-{number}.img"
        data = os.urandom(size)
        with open(os.path.join(images, name), "ab") as f:
            f.write(data)
        written.setdefault(name, bytearray()).extend(data)
        if look:
            follower.poll()
    if late:
        with open(os.path.join(images, "pages-9.img"), "wb") as f:
            f.write(b"late" * 300)
        written["pages-9.img"] = bytearray(b"late" * 300)
    os.makedirs(aside, exist_ok=True)
    for name in written:
        if int(name.split("-")[1].split(".")[0]) in moved:
            os.rename(os.path.join(images, name), os.path.join(aside, name))
    with open(os.path.join(images, "core-1.img"), "wb") as f:
        f.write(b"core")
    writer.add_images(images, pages=False)
    follower.finish(aside, images)
    writer.add_bytes("config.dump", b"{}")
    writer.close()
    return archive, {n: bytes(d) for n, d in written.items()}


def _read_all(archive: str) -> bytes:
    reader = SplicedReader(archive)
    out = bytearray()
    while data := reader.read(777):
        out.extend(data)
    reader.close()
    return bytes(out)


@settings(max_examples=80, deadline=None)
@given(steps=steps_strategy, moved=st.sets(st.integers(1, 9)), late=st.booleans())
def test_followed_pages_arrive_whole(tmp_path_factory, monkeypatch_module, steps, moved, late):
    folder = str(tmp_path_factory.mktemp("follow"))
    archive, written = _dump(folder, steps, moved, late)
    raw = _read_all(archive)

    # The destination placing pages for CRIU: every page file whole, the rest without them.
    pages_dir, rest = os.path.join(folder, "landed"), os.path.join(folder, "rest.tar")
    os.makedirs(pages_dir)
    fd = os.open(rest, os.O_WRONLY | os.O_CREAT, 0o600)
    splitter = PagesSplitter(fd, pages_dir)
    splitter.feed(raw)
    assert sorted(splitter.close()) == sorted(written)
    os.close(fd)
    for name, data in written.items():
        with open(os.path.join(pages_dir, name), "rb") as f:
            assert f.read() == data
    with tarfile.open(rest) as tar:
        assert tar.getnames() == ["checkpoint", "checkpoint/core-1.img", "config.dump"]

    # A destination that cannot place them: parts joined back into a whole member, others untouched.
    joined, whole = os.path.join(folder, "joined"), os.path.join(folder, "whole.tar")
    os.makedirs(joined)
    fd = os.open(whole, os.O_RDWR | os.O_CREAT, 0o600)
    splitter = PagesSplitter(fd, joined, whole=False)
    splitter.feed(raw)
    join_pages(fd, splitter.end_at, joined, splitter.close())
    os.close(fd)
    with tarfile.open(whole) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert {n: d for n, d in got.items() if "pages-" in n} == {f"checkpoint/{n}": d for n, d in written.items()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(podman_archive, "PART", PART)
        yield mp


def test_memory_goes_out_during_the_dump(tmp_path, monkeypatch):
    """Parts are in the archive before CRIU is done, so a reader already has them."""
    monkeypatch.setattr(podman_archive, "PART", 4096)
    images = tmp_path / "checkpoint"
    images.mkdir()
    writer = ArchiveWriter(str(tmp_path / "a.tar"), references=True)
    follower = PagesFollower(writer, str(images), str(tmp_path / "links"))
    stop = threading.Event()
    thread = threading.Thread(target=follower.follow, args=(stop,))
    thread.start()
    try:
        with open(images / "pages-1.img", "wb") as f:
            f.write(os.urandom(3 * 4096 + 100))
        reader = SplicedReader(str(tmp_path / "a.tar"))
        got = bytearray()
        for _ in range(400):
            got.extend(reader.read(1 << 20))
            if len(got) >= 512 + 3 * 4096:
                break
            stop.wait(0.005)
        reader.close()
    finally:
        stop.set()
        thread.join()
    info = tarfile.TarInfo.frombuf(bytes(got[:512]), "utf-8", "surrogateescape")
    assert info.name == "checkpoint/pages-1.img.part-0" and info.size == 3 * 4096
    assert follower.sent == {"pages-1.img": 3 * 4096}   # the last 100 bytes wait for finish()


def test_a_rollback_returns_pages_and_drops_the_links(tmp_path):
    static = tmp_path / "userdata"
    (static / "checkpoint").mkdir(parents=True)
    (static / "stasis-pages" / "streamed").mkdir(parents=True)
    (static / "stasis-pages" / "pages-1.img").write_bytes(b"p" * 100)
    os.link(static / "stasis-pages" / "pages-1.img", static / "stasis-pages" / "streamed" / "pages-1.img")
    PodmanRuntime._pages_back(str(static))
    assert (static / "checkpoint" / "pages-1.img").read_bytes() == b"p" * 100
    assert not (static / "stasis-pages").exists()


def test_parts_out_of_order_are_refused(tmp_path):
    def member(name: str, data: bytes) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info.tobuf(tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512)

    cases = [member("checkpoint/pages-1.img.part-0", b"a" * 10) + member("checkpoint/pages-1.img.part-20", b"b"),
             member("checkpoint/pages-1.img.part-5", b"b"),
             member("checkpoint/pages-1.img.part-0", b"a") + member("checkpoint/pages-1.img", b"again")]
    for i, raw in enumerate(cases):
        pages = tmp_path / f"p{i}"
        pages.mkdir()
        fd = os.open(tmp_path / f"rest{i}", os.O_WRONLY | os.O_CREAT, 0o600)
        with pytest.raises(Exception, match="does not continue"):
            PagesSplitter(fd, str(pages)).feed(raw + bytes(1024))
        os.close(fd)
    # Without placement, a page file kept whole may not be continued by parts either.
    fd = os.open(tmp_path / "rest-kept", os.O_WRONLY | os.O_CREAT, 0o600)
    with pytest.raises(Exception, match="does not continue"):
        PagesSplitter(fd, str(tmp_path), whole=False).feed(
            member("checkpoint/pages-1.img", b"a") + member("checkpoint/pages-1.img.part-0", b"b"))
    os.close(fd)


def _pages_written() -> int:
    with open("/proc/vmstat") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("nr_written "))


def test_followed_pages_start_their_way_to_disk():
    """podman's clean-up syncs the whole filesystem at the end of the dump: pages the follower has
    taken are already being written by then (counted by the kernel's nr_written, which only grows).
    In /var/tmp, which is on disk as podman's storage is (/tmp may be a tmpfs)."""
    folder = tempfile.mkdtemp(prefix="stasis-writeback-", dir="/var/tmp")
    try:
        path = os.path.join(folder, "pages-1.img")
        size = 16 << 20
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        before = _pages_written()
        podman_archive.start_writeback(path, 0, size)
        deadline = time.monotonic() + 10
        while _pages_written() - before < size // 4096 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _pages_written() - before >= size // 4096
        podman_archive.start_writeback(os.path.join(folder, "gone.img"), 0, 1)   # moved already: nothing
    finally:
        shutil.rmtree(folder, ignore_errors=True)
