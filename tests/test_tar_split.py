"""The destination's pages splitter: any archive, fed in any pieces, comes out as the same archive
without its pages plus the pages as files, byte for byte."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stasis.agent.tar_split import PagesSplitter, SplitError

NAMES = ["checkpoint/pages-1.img", "checkpoint/pages-2.img", "checkpoint/core-1.img", "config.dump",
         "rootfs-diff.tar", "checkpoint/pagemap-1.img", "./checkpoint/pages-3.img",
         "x/" + "long-name-" * 12 + "pages-4.img", "checkpoint/pages-5.img.bak"]


def _archive(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1700000000.25   # a float mtime: a pax header per member
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _split(raw: bytes, cuts: list[int], folder: str) -> tuple[bytes, list[str]]:
    rest = os.path.join(folder, "rest.tar")
    pages = os.path.join(folder, "pages")
    os.makedirs(pages)
    fd = os.open(rest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        splitter = PagesSplitter(fd, pages)
        pos = 0
        for cut in sorted(set(c % (len(raw) + 1) for c in cuts)) + [len(raw)]:
            splitter.feed(raw[pos:cut])
            pos = max(pos, cut)
        names = splitter.close()
    finally:
        os.close(fd)
    with open(rest, "rb") as f:
        return f.read(), names


members_strategy = st.lists(st.tuples(st.sampled_from(NAMES), st.binary(max_size=2100)), max_size=8,
                            unique_by=lambda m: m[0])


@settings(max_examples=150, deadline=None)
@given(members=members_strategy, cuts=st.lists(st.integers(min_value=0, max_value=40000), max_size=12),
       fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
def test_any_archive_in_any_pieces_splits_exactly(tmp_path_factory, members, cuts, fmt):
    if fmt == tarfile.USTAR_FORMAT:
        members = [m for m in members if len(m[0]) <= 100]
    folder = str(tmp_path_factory.mktemp("split"))
    rest, names = _split(_archive(members, fmt), cuts, folder)
    expect_pages = {n.split("/")[-1]: d for n, d in members
                    if n.lstrip("./").startswith("checkpoint/pages-") and n.endswith(".img")
                    and not n.endswith(".bak")}
    assert sorted(names) == sorted(expect_pages)
    for page, data in expect_pages.items():
        with open(os.path.join(folder, "pages", page), "rb") as f:
            assert f.read() == data
    with tarfile.open(fileobj=io.BytesIO(rest)) as tar:
        kept = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert kept == {tarfile.TarInfo(n).name: d for n, d in members if n.split("/")[-1] not in expect_pages}


def test_a_big_page_file_goes_aside_whole(tmp_path):
    data = os.urandom(3 << 20)
    raw = _archive([("checkpoint/inventory.img", b"inv"), ("checkpoint/pages-1.img", data)], tarfile.PAX_FORMAT)
    rest, names = _split(raw, list(range(0, len(raw), 1 << 20)), str(tmp_path))
    assert names == ["pages-1.img"] and len(rest) < 8192
    with open(tmp_path / "pages" / "pages-1.img", "rb") as f:
        assert f.read() == data


def test_a_stream_cut_mid_member_is_refused(tmp_path):
    raw = _archive([("checkpoint/pages-1.img", b"x" * 5000)], tarfile.PAX_FORMAT)
    with pytest.raises(SplitError, match="middle of a member"):
        _split(raw[:3000], [], str(tmp_path))


def test_a_damaged_header_is_refused(tmp_path):
    raw = bytearray(_archive([("config.dump", b"{}")], tarfile.USTAR_FORMAT))
    raw[0] ^= 0xFF   # the checksum no longer matches
    with pytest.raises(SplitError, match="malformed tar header"):
        _split(bytes(raw), [], str(tmp_path))


@pytest.mark.parametrize("record", [b"10 size=x\n", b"99 path=a\n", b"7 junk\n", b"12 size=-5\n"])
def test_malformed_pax_records_are_refused(tmp_path, record):
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    member = tarfile.TarInfo("checkpoint/pages-1.img")
    raw = (pax.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512) + member.tobuf(tarfile.USTAR_FORMAT)
           + bytes(1024))
    with pytest.raises(SplitError, match="pax|size"):
        _split(raw, [], str(tmp_path))


def test_an_oversized_extended_header_is_refused(tmp_path):
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 2 << 20
    with pytest.raises(SplitError, match="extended tar header"):
        _split(pax.tobuf(tarfile.USTAR_FORMAT), [], str(tmp_path))


def test_a_sparse_page_file_stays_in_the_archive(tmp_path):
    record = b"22 GNU.sparse.major=1\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    member = tarfile.TarInfo("checkpoint/pages-1.img")
    raw = pax.tobuf(tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512) + member.tobuf() + bytes(1024)
    rest, names = _split(raw, [700], str(tmp_path))
    assert names == [] and rest == raw


def test_the_first_page_file_takes_over_a_pool_and_keeps_only_its_own_bytes(tmp_path):
    """A pool (agent/pool.py) larger than the pages is taken over by the first page file, in parts
    written in place and cut to size; the next page file is a file of its own."""
    pages = tmp_path / "pages"
    pages.mkdir()
    pool = pages / "pool"
    pool.write_bytes(b"\xee" * (5 << 20))
    inode = os.stat(pool).st_ino
    first, second = os.urandom(3 << 20), os.urandom(5000)
    raw = _archive([("checkpoint/pages-1.img.part-0", first[:1 << 20]),
                    ("checkpoint/pages-1.img.part-1048576", first[1 << 20:]),
                    ("checkpoint/pages-2.img", second)], tarfile.PAX_FORMAT)
    fd = os.open(tmp_path / "rest.tar", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        splitter = PagesSplitter(fd, str(pages), pool=str(pool))
        for at in range(0, len(raw), 70_000):
            splitter.feed(raw[at:at + 70_000])
        assert splitter.close() == ["pages-1.img", "pages-2.img"]
    finally:
        os.close(fd)
    assert not pool.exists() and os.stat(pages / "pages-1.img").st_ino == inode
    assert (pages / "pages-1.img").read_bytes() == first and (pages / "pages-2.img").read_bytes() == second
