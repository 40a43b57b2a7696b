"""CRIU image decoding (stasis.forensics): hand-made and fuzzed images, then a real podman checkpoint."""

from __future__ import annotations

import codecs
import os
import re
import secrets
import struct
import subprocess
import tarfile
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


from stasis.errors import InvalidArgument
from stasis.forensics import images
from stasis.forensics.images import IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC, ImageError, read_image
from stasis.forensics.memory import PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT, ProcessMemory
from tests.conftest import require_criu_decoders

require_criu_decoders()

from stasis.forensics.criu_pb import (  # noqa: E402
    core_pb2,
    fdinfo_pb2,
    inventory_pb2,
    mm_pb2,
    pagemap_pb2,
    pipe_data_pb2,
    pstree_pb2,
    regfile_pb2,
    stats_pb2,
    vma_pb2,
)

MAGIC = {k.name: m for m, k in images.KINDS.items()}


def image(kind: str, *msgs, payloads: dict[int, bytes] | None = None) -> bytes:
    """An image file as CRIU writes it: magics, then size-prefixed entries (and raw payloads)."""
    if kind == "inventory":
        out = struct.pack("<I", MAGIC[kind])
    else:
        out = struct.pack("<II", IMG_SERVICE_MAGIC if kind == "stats" else IMG_COMMON_MAGIC, MAGIC[kind])
    for i, m in enumerate(msgs):
        data = m.SerializeToString()
        out += struct.pack("<I", len(data)) + data + (payloads or {}).get(i, b"")
    return out


def pstree(pid, ppid):
    return pstree_pb2.pstree_entry(pid=pid, ppid=ppid, pgid=1, sid=1, threads=[pid])


# --- the image reader -------------------------------------------------------------------------------

def test_entries_decode_to_criu_messages():
    img = read_image(image("pstree", pstree(1, 0), pstree(7, 1)), "pstree.img", expect="pstree")
    assert [(e.pid, e.ppid) for e in img.entries] == [(1, 0), (7, 1)] and img.kind.name == "pstree"

    pm = read_image(image("pagemap", pagemap_pb2.pagemap_head(pages_id=3),
                          pagemap_pb2.pagemap_entry(vaddr=0x1000, nr_pages=2, flags=PE_PRESENT)))
    assert pm.head.pages_id == 3 and pm.entries[0].nr_pages == 2

    inv = read_image(image("inventory", inventory_pb2.inventory_entry(img_version=2, fdinfo_per_id=True)))
    assert inv.kind.name == "inventory" and inv.entries[0].img_version == 2

    dump = stats_pb2.dump_stats_entry(freezing_time=1, frozen_time=2, memdump_time=3, memwrite_time=4,
                                      pages_scanned=5, pages_skipped_parent=0, pages_written=6, pages_lazy=0)
    assert read_image(image("stats", stats_pb2.stats_entry(dump=dump))).entries[0].dump.pages_written == 6


def test_raw_bytes_after_entries_are_kept_apart():
    e1 = pipe_data_pb2.pipe_data_entry(pipe_id=1, bytes=5)
    e2 = pipe_data_pb2.pipe_data_entry(pipe_id=2, bytes=0)
    e3 = pipe_data_pb2.pipe_data_entry(pipe_id=3, bytes=3)
    img = read_image(image("pipes-data", e1, e2, e3, payloads={0: b"hello", 2: b"abc"}))
    assert [e.pipe_id for e in img.entries] == [1, 2, 3]
    assert img.payloads == {0: b"hello", 1: b"", 2: b"abc"}
    with pytest.raises(ImageError, match=r"pipes-data.img is truncated: entry 1 claims 3 bytes of data, 2 remain"):
        read_image(image("pipes-data", e3, payloads={0: b"ab"}), "pipes-data.img")


def test_files_on_disk_and_their_names(tmp_path):
    (tmp_path / "pstree.img").write_bytes(image("pstree", pstree(1, 0)))
    assert read_image(str(tmp_path / "pstree.img")).name == "pstree.img"
    with pytest.raises(ImageError, match=r"^core-4.img cannot be read: No such file"):
        read_image(tmp_path / "core-4.img")


CORE_HEAD = struct.pack("<II", IMG_COMMON_MAGIC, MAGIC["core"])


@pytest.mark.parametrize("data,message", [
    (b"", "core-1.img is truncated: 0 bytes, too short for a CRIU image header"),
    (CORE_HEAD[:6], "core-1.img is truncated: 6 bytes, too short for a CRIU image header"),
    (b"\x7fELF" + b"\0" * 12, "core-1.img is not a CRIU image (magic 0x464c457f)"),
    (struct.pack("<II", IMG_COMMON_MAGIC, 0x12345678),
     "core-1.img has an unknown or unsupported image magic 0x12345678"),
    (CORE_HEAD + struct.pack("<I", 812) + b"x" * 20, "core-1.img is truncated: entry 1 claims 812 bytes, 20 remain"),
    (CORE_HEAD + b"\x01\x00", "core-1.img is truncated: entry 1 has a 2-byte size field"),
    (CORE_HEAD + struct.pack("<I", 1 << 31), f"core-1.img is corrupt: entry 1 claims {1 << 31} bytes (limit"),
    (CORE_HEAD + struct.pack("<I", 3) + b"\xff\xff\xff", "core-1.img is corrupt: entry 1 is not a valid core_entry"),
    (CORE_HEAD + struct.pack("<I", 0), "core-1.img is corrupt: entry 1 lacks required fields of core_entry"),
])
def test_every_problem_is_one_line_naming_the_file(data, message):
    with pytest.raises(ImageError) as err:
        read_image(data, "core-1.img")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_wrong_kind_of_image_is_refused():
    with pytest.raises(ImageError, match=r"^mm-1.img is not a mm image: it holds pstree entries$"):
        read_image(image("pstree", pstree(1, 0)), "mm-1.img", expect="mm")
    with pytest.raises(ImageError, match=r"pagemap-1.img is truncated: its pagemap_head is missing"):
        read_image(struct.pack("<II", IMG_COMMON_MAGIC, MAGIC["pagemap"]), "pagemap-1.img")


def test_images_too_big_to_hold_are_refused(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE", 100)
    with pytest.raises(ImageError, match=r"^pstree.img is too large"):
        read_image(image("pstree", *[pstree(i, 1) for i in range(1, 30)]), "pstree.img")


def _check_only_image_errors(data: bytes) -> None:
    try:
        read_image(data, "fuzz.img")
    except ImageError as e:
        assert str(e).startswith("fuzz.img ") and "\n" not in str(e)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADERS = st.sampled_from([b""] + [struct.pack("<II", IMG_COMMON_MAGIC, m) for m in images.KINDS]
                          + [struct.pack("<I", images.INVENTORY_MAGIC)])


@FUZZ
@given(HEADERS, st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_image_error(header, body):
    _check_only_image_errors(header + body)


def _valid_images() -> list[bytes]:
    core = core_pb2.core_entry(mtype=core_pb2.core_entry.X86_64)
    core.tc.task_state, core.tc.exit_code, core.tc.personality, core.tc.flags = 1, 0, 0, 0
    core.tc.blk_sigset, core.tc.comm = 0, "sh"
    mm = mm_pb2.mm_entry(mm_start_code=0x400000, mm_end_code=0x401000, mm_start_data=0, mm_end_data=0,
                         mm_start_stack=0, mm_start_brk=0, mm_brk=0, mm_arg_start=0, mm_arg_end=0,
                         mm_env_start=0, mm_env_end=0, exe_file_id=1,
                         vmas=[vma_pb2.vma_entry(start=0x400000, end=0x401000, pgoff=0, shmid=1, prot=5, flags=2,
                                                 status=0x41, fd=-1)])
    fd = fdinfo_pb2.fdinfo_entry(id=1, flags=0, type=fdinfo_pb2.REG, fd=0)
    reg = regfile_pb2.reg_file_entry(id=1, flags=0, pos=0, name="/bin/sh")
    reg.fown.uid, reg.fown.euid, reg.fown.signum, reg.fown.pid_type, reg.fown.pid = 0, 0, 0, 0, 0
    files = fdinfo_pb2.file_entry(type=fdinfo_pb2.REG, id=1, reg=reg)
    return [
        image("pstree", pstree(1, 0), pstree(2, 1)),
        image("core", core),
        image("mm", mm),
        image("fdinfo", fd, fd),
        image("files", files),
        image("pagemap", pagemap_pb2.pagemap_head(pages_id=1),
              pagemap_pb2.pagemap_entry(vaddr=0x400000, nr_pages=1, flags=PE_PRESENT)),
        image("pipes-data", pipe_data_pb2.pipe_data_entry(pipe_id=1, bytes=4), payloads={0: b"data"}),
        image("inventory", inventory_pb2.inventory_entry(img_version=2)),
    ]


VALID = _valid_images()


@FUZZ
@given(st.sampled_from(VALID), st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "cut"]),
                                                  st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6))
def test_fuzz_mutated_images_only_raise_image_error(data, mutations):
    buf = bytearray(data)
    for op, pos, value in mutations:
        pos %= len(buf) + 1
        if op == "flip" and pos < len(buf):
            buf[pos] ^= value or 1
        elif op == "insert":
            buf[pos:pos] = bytes([value])
        elif op == "delete":
            del buf[pos:pos + 1 + value % 8]
        elif op == "cut":
            del buf[pos:]
    _check_only_image_errors(bytes(buf))


def test_the_valid_seeds_decode():
    for data in VALID:
        read_image(data)


# --- process memory ---------------------------------------------------------------------------------

def _vma(start, end, status=0x201, flags=0x22, prot=3, shmid=0):
    return vma_pb2.vma_entry(start=start, end=end, pgoff=0, shmid=shmid, prot=prot, flags=flags, status=status, fd=-1)


def write_process(folder, pid: int, vmas, runs, pages: bytes, pages_id: int = 1, env=(0, 0)) -> None:
    """mm-PID.img, pagemap-PID.img and pages-ID.img for a made-up process."""
    mm = mm_pb2.mm_entry(mm_start_code=0, mm_end_code=0, mm_start_data=0, mm_end_data=0, mm_start_stack=0,
                         mm_start_brk=0, mm_brk=0, mm_arg_start=0, mm_arg_end=0, mm_env_start=env[0],
                         mm_env_end=env[1], exe_file_id=0, vmas=vmas)
    entries = [pagemap_pb2.pagemap_entry(vaddr=v, nr_pages=n, flags=f) for v, n, f in runs]
    with open(os.path.join(folder, f"mm-{pid}.img"), "wb") as f:
        f.write(image("mm", mm))
    with open(os.path.join(folder, f"pagemap-{pid}.img"), "wb") as f:
        f.write(image("pagemap", pagemap_pb2.pagemap_head(pages_id=pages_id), *entries))
    with open(os.path.join(folder, f"pages-{pages_id}.img"), "wb") as f:
        f.write(pages)


def page(fill: bytes) -> bytes:
    return (fill * PAGE_SIZE)[:PAGE_SIZE]


@pytest.fixture
def proc(tmp_path):
    """Two mappings: [0x10000, 0x14000) file-backed, [0x14000, 0x20000) anonymous.

    Runs: 0x10000-0x12000 stored (pages A, B), 0x12000 in the parent (absent), 0x13000 lazy (absent),
    0x14000-0x15000 stored (C), 0x15000 stored (D) as a separate entry, 0x1f000 stored (E).
    """
    reg = regfile_pb2.reg_file_entry(id=9, flags=0, pos=0, name="/bin/app")
    reg.fown.uid, reg.fown.euid, reg.fown.signum, reg.fown.pid_type, reg.fown.pid = 0, 0, 0, 0, 0
    (tmp_path / "files.img").write_bytes(image("files", fdinfo_pb2.file_entry(type=fdinfo_pb2.REG, id=9, reg=reg)))
    vmas = [_vma(0x14000, 0x20000), _vma(0x10000, 0x14000, status=0x41, flags=0x2, prot=5, shmid=9)]
    runs = [(0x10000, 2, PE_PRESENT), (0x12000, 1, PE_PARENT), (0x13000, 1, PE_LAZY), (0x14000, 1, PE_PRESENT),
            (0x15000, 1, PE_PRESENT), (0x1f000, 1, PE_PRESENT)]
    pages = page(b"A") + page(b"B") + page(b"C") + page(b"D") + page(b"E")
    pages = pages[:3 * PAGE_SIZE - 3] + b"NEEDLE" + pages[3 * PAGE_SIZE + 3:]     # across the C|D entries
    write_process(str(tmp_path), 5, vmas, runs, pages)
    with ProcessMemory.open(str(tmp_path), 5) as m:
        yield m


def test_ranges_follow_pagemap_and_mappings(proc):
    got = [(r.start, r.end, r.offset, r.vma.label, r.vma.perms) for r in proc.ranges()]
    assert got == [(0x10000, 0x12000, 0, "/bin/app", "r-xp"),
                   (0x14000, 0x15000, 2 * PAGE_SIZE, "[anon]", "rw-p"),
                   (0x15000, 0x16000, 3 * PAGE_SIZE, "[anon]", "rw-p"),
                   (0x1f000, 0x20000, 4 * PAGE_SIZE, "[anon]", "rw-p")]


def test_read_fills_absent_pages_with_zeros_and_names_them(proc):
    data = proc.read(0x11ffe, 2 + 2 * PAGE_SIZE + 2)
    assert data[:2] == b"BB" and data[2:-2] == bytes(2 * PAGE_SIZE) and data[-2:] == b"CC"
    assert proc.holes(0x11ffe, 2 + 2 * PAGE_SIZE + 2) == [(0x12000, 0x14000)]
    assert proc.holes(0x0, 0x10000) == [(0, 0x10000)]
    assert proc.read(0x1f000, 4) == b"EEEE"
    with pytest.raises(InvalidArgument):
        proc.read(0x10000, 1 << 30)


@pytest.mark.parametrize("chunk", [1, 100, PAGE_SIZE, 1 << 20])
def test_search_finds_matches_across_runs_and_chunks(proc, chunk):
    hits = list(proc.search(b"NEEDLE", chunk=chunk))
    assert [(h.vaddr, h.offset, h.vma.start) for h in hits] == [(0x15000 - 3, 3 * PAGE_SIZE - 3, 0x14000)]
    regex = [h.match for h in proc.search(re.compile(rb"E{4,8}"), max_match=8, chunk=chunk)]
    assert regex[0] == b"EEEEEEEE" and len(regex) == PAGE_SIZE // 8
    assert list(proc.search(b"AB", chunk=chunk)) != []                  # A|B are adjacent in one run
    assert list(proc.search(b"B\0")) == [] and list(proc.search(b"BC")) == []   # never across a hole


def test_inconsistent_memory_images_are_refused(tmp_path):
    folder = str(tmp_path)
    write_process(folder, 1, [_vma(0x1000, 0x3000)], [(0x1000, 2, PE_PRESENT)], page(b"a"))
    with pytest.raises(ImageError, match=r"^pages-1.img is truncated: pagemap-1.img needs 8192 bytes, it holds 4096"):
        ProcessMemory.open(folder, 1)
    write_process(folder, 1, [_vma(0x1000, 0x3000)], [(0x1000, 2, PE_PRESENT), (0x2000, 1, PE_PRESENT)], b"")
    with pytest.raises(ImageError, match=r"pagemap-1.img is corrupt: pages at 0x2000 are stored twice"):
        ProcessMemory.open(folder, 1)
    write_process(folder, 1, [_vma(0x1000, 0x3000), _vma(0x2000, 0x4000)], [], b"")
    with pytest.raises(ImageError, match=r"mm-1.img is corrupt: mappings at 0x1000 and 0x2000 overlap"):
        ProcessMemory.open(folder, 1)
    write_process(folder, 1, [], [(0x1001, 1, PE_PRESENT)], b"")
    with pytest.raises(ImageError, match=r"pagemap-1.img is corrupt: entry 2 maps 1 pages at 0x1001"):
        ProcessMemory.open(folder, 1)
    os.remove(os.path.join(folder, "pages-1.img"))
    write_process(folder, 2, [], [], b"", pages_id=7)
    os.remove(os.path.join(folder, "pages-7.img"))
    with pytest.raises(ImageError, match=r"pages-7.img \(named by pagemap-2.img\) is missing"):
        ProcessMemory.open(folder, 2)


@FUZZ
@given(vmas=st.lists(st.tuples(st.integers(0, 64), st.integers(0, 64)), max_size=5),
       runs=st.lists(st.tuples(st.integers(0, 70), st.integers(0, 8), st.integers(0, 7)), max_size=8),
       pages=st.integers(0, 40), probe=st.integers(0, 80))
def test_fuzz_memory_images_only_raise_image_error(vmas, runs, pages, probe):
    with tempfile.TemporaryDirectory() as folder:
        write_process(folder, 1, [_vma(a * PAGE_SIZE, b * PAGE_SIZE) for a, b in vmas],
                      [(v * PAGE_SIZE, n, f) for v, n, f in runs], page(b"z") * pages)
        try:
            m = ProcessMemory.open(folder, 1)
        except ImageError:
            return
        with m:
            list(m.ranges())
            assert len(m.read(probe * PAGE_SIZE - 7 if probe else 0, 3 * PAGE_SIZE)) == 3 * PAGE_SIZE
            list(m.search(b"zz", chunk=PAGE_SIZE + 1))


# --- a real checkpoint ------------------------------------------------------------------------------

IMAGE = "localhost/stasis-forensics:1"


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=180, check=check)


def extract_checkpoint(archive: str, dest: str) -> str:
    """Only the plain files of checkpoint/ (and stats-dump), by base name: nothing from the archive
    chooses where a byte lands."""
    folder = os.path.join(dest, "checkpoint")
    os.makedirs(folder)
    with tarfile.open(archive) as tar:
        for member in tar:
            name = member.name.removeprefix("./")
            if member.isfile() and (re.fullmatch(r"checkpoint/[\w.-]+\.img", name) or name == "stats-dump"):
                with tar.extractfile(member) as src, open(os.path.join(folder, os.path.basename(name)), "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
    return folder


@pytest.fixture
def checkpointed(real_stack, tmp_path):
    """A checkpoint of `sh` (pid 1) with a `sleep` child, a secret in its environment and one that only
    exists in sh's heap (the command line carries it rot13-encoded, sh decodes it into a variable)."""
    from stasis.testbed.images import rootfs_tar

    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        podman("import", "--quiet", rootfs_tar(with_workload=False), IMAGE)
    name = f"fx-{secrets.token_hex(4)}"
    env_secret, heap_secret = f"envsecret-{secrets.token_hex(8)}", f"heapsecret-{secrets.token_hex(8)}"
    script = f"S=$(echo {codecs.encode(heap_secret, 'rot13')} | tr a-z n-za-m); sleep 1000 & wait"
    try:
        podman("run", "-d", "--network", "none", "--name", name, "-e", f"FX_SECRET={env_secret}", IMAGE,
               "sh", "-c", script)
        deadline = time.monotonic() + 30
        while "sleep" not in (top := podman("top", name, "pid", "ppid", "comm", check=False).stdout):
            assert time.monotonic() < deadline, f"the container's processes never started: {top}"
            time.sleep(0.2)
        procs = {int(f[0]): (int(f[1]), f[2]) for f in (line.split() for line in top.splitlines()[1:])}
        archive = str(tmp_path / "ckpt.tar")
        podman("container", "checkpoint", name, "--export", archive, "--compress", "none")
        yield extract_checkpoint(archive, str(tmp_path)), procs, env_secret, heap_secret, script
    finally:
        podman("rm", "-f", name, check=False)


@pytest.mark.e2e
def test_a_real_checkpoint_decodes(checkpointed):
    folder, procs, env_secret, heap_secret, script = checkpointed
    tree = read_image(os.path.join(folder, "pstree.img"), expect="pstree").entries
    assert {e.pid: e.ppid for e in tree} == {pid: ppid for pid, (ppid, _) in procs.items()}
    assert len(tree) == 2 and tree[0].ppid == 0
    sh, sleep = tree[0].pid, tree[1].pid
    comms = {e.pid: read_image(os.path.join(folder, f"core-{e.pid}.img"), expect="core").entries[0].tc.comm
             for e in tree}
    assert comms == {sh: "sh", sleep: "sleep"} == {pid: comm for pid, (_, comm) in procs.items()}

    files = {e.id: e.reg.name for e in read_image(os.path.join(folder, "files.img")).entries if e.HasField("reg")}
    stats = read_image(os.path.join(folder, "stats-dump"), expect="stats").entries[0]
    assert stats.dump.pages_written > 0
    for pid in (sh, sleep):
        mm = read_image(os.path.join(folder, f"mm-{pid}.img"), expect="mm").entries[0]
        assert files[mm.exe_file_id] == "/bin/busybox"
        with ProcessMemory.open(folder, pid) as mem:
            assert any(v.path == "/bin/busybox" and v.perms == "r-xp" for v in mem.vmas)
            # The environment is read out of the dumped stack, where mm says it lies.
            env = mem.read(mm.mm_env_start, mm.mm_env_end - mm.mm_env_start).split(b"\0")
            assert f"FX_SECRET={env_secret}".encode() in env
            hits = list(mem.search(env_secret.encode()))
            assert any(mm.mm_env_start <= h.vaddr < mm.mm_env_end for h in hits)
            assert all(h.vma and h.vma.start <= h.vaddr < h.vma.end for h in hits)
            argv = mem.read(mm.mm_arg_start, mm.mm_arg_end - mm.mm_arg_start).split(b"\0")
            assert argv[:-1] == ([b"sh", b"-c", script.encode()] if pid == sh else [b"sleep", b"1000"])
            heap_hits = list(mem.search(heap_secret.encode()))
            if pid == sh:
                assert heap_hits and all(h.vma.label == "[heap]" for h in heap_hits), heap_hits
                assert mem.read(heap_hits[0].vaddr, len(heap_secret)) == heap_secret.encode()
            else:
                assert heap_hits == []      # the child never decoded it
