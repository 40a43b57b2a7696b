"""The source's spliced archive: read as it grows, in any pieces, it is byte for byte the archive
the writer would have written with every member copied in."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stasis.agent import spliced_archive
from stasis.agent.podman_archive import ArchiveWriter
from stasis.agent.spliced_archive import SplicedReader

# A step of writing: ("pages", sizes of pages-N.img files) or ("bytes", size of a small member).
steps_strategy = st.lists(st.one_of(
    st.tuples(st.just("pages"), st.lists(st.integers(0, 5000), min_size=1, max_size=3)),
    st.tuples(st.just("bytes"), st.integers(0, 1500))), min_size=1, max_size=6)


def _write(folder: str, path: str, steps, references: bool, between=lambda: None) -> None:
    writer = ArchiveWriter(path, references)
    for i, (kind, arg) in enumerate(steps):
        if kind == "pages":
            pages = os.path.join(folder, f"aside-{i}")
            os.makedirs(pages, exist_ok=True)
            for j, size in enumerate(arg):
                name = os.path.join(pages, f"pages-{j + 1}.img")
                if not os.path.exists(name):
                    with open(name, "wb") as f:
                        f.write(os.urandom(size))
            writer.add_pages(pages, arcname=f"checkpoint-{i}")
        else:
            writer.add_bytes(f"member-{i}", bytes([i]) * arg)
        between()
    writer.close()
    between()


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, reads=st.lists(st.integers(1, 3000), min_size=1, max_size=20))
def test_read_while_written_it_is_the_copied_archive(tmp_path_factory, steps, reads):
    folder = str(tmp_path_factory.mktemp("spliced"))
    copied = os.path.join(folder, "copied.tar")
    _write(folder, copied, steps, references=False)
    with open(copied, "rb") as f:
        expected = f.read()

    spliced = os.path.join(folder, "spliced.tar")
    got = bytearray()
    sizes = itertools.cycle(reads)
    reader: list[SplicedReader] = []

    def read_some() -> None:   # the sender, between two steps of the writer
        if not reader:
            reader.append(SplicedReader(spliced))
        for _ in range(3):
            got.extend(reader[0].read(next(sizes)))

    _write(folder, spliced, steps, references=True, between=read_some)
    while data := reader[0].read(next(sizes)):
        got.extend(data)
    reader[0].close()
    assert bytes(got) == expected
    assert spliced_archive.logical_size(spliced) == len(expected)
    assert os.path.getsize(spliced) <= len(expected)


def test_the_pages_are_not_copied(tmp_path):
    (tmp_path / "aside").mkdir()
    (tmp_path / "aside" / "pages-1.img").write_bytes(os.urandom(4 << 20))
    archive = str(tmp_path / "a.tar")
    writer = ArchiveWriter(archive, references=True)
    writer.add_pages(str(tmp_path / "aside"))
    writer.close()
    assert os.path.getsize(archive) < 4096
    assert spliced_archive.logical_size(archive) == 512 + (4 << 20) + 1024   # header, data, end blocks


def test_a_referenced_file_that_shrank_is_an_error(tmp_path):
    (tmp_path / "aside").mkdir()
    page = tmp_path / "aside" / "pages-1.img"
    page.write_bytes(b"x" * 10000)
    archive = str(tmp_path / "a.tar")
    writer = ArchiveWriter(archive, references=True)
    writer.add_pages(str(tmp_path / "aside"))
    writer.close()
    page.write_bytes(b"x" * 10)
    reader = SplicedReader(archive)
    with pytest.raises(OSError, match="shrank"):
        while reader.read(4096):
            pass
    reader.close()
