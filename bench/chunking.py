"""Benchmark: which chunker dedups real CRIU checkpoint archives best, content-defined or fixed-size.

The repository stores checkpoints as chunks addressed by their hash, so what a second backup of the
same container costs is the bytes of the chunks the repository has not seen yet. This script takes
three successive checkpoints of one running container (`podman container checkpoint --export
--compress none --leave-running`: a tar of CRIU images, pages-*.img, rootfs-diff.tar, ...), with
memhold rewriting 5% of its pages (SIGUSR2) between two checkpoints, then cuts the archives with
each chunker and hashes every chunk with BLAKE3. For each chunker it reports:

  - chunks per archive and their mean size;
  - new bytes of checkpoint 2 and 3: unique chunks seen in no earlier archive, absolute and as a
    share of that archive's size (what an incremental backup would upload);
  - throughput of cutting + hashing (MB/s = 10^6 bytes/s, one thread, archives in the page cache).

Chunkers:

  - FastCDC (pyfastcdc, FastCDC 2020, normalized chunking 1) over the whole archive, avg 64 KiB,
    256 KiB and 1 MiB, min = avg/4, max = avg*4. Its actual mean is about avg + min.
  - fixed-size over the whole archive, 4 KiB, 64 KiB and 1 MiB.
  - tar-member fixed-size, 4 KiB, 64 KiB and 1 MiB: each member's data is cut on its own, pieces
    aligned to the member's start, so the memory pages inside pages-*.img stay page-aligned however
    the tar headers and the members before it shift; headers and padding between members are
    chunks of their own.

The workload is memhold holding --mib MiB, half of its pages compressible. Everything runs in a
private mount namespace with its own podman store (the testbed's host layout), the container with
`--network none`; all of it is removed at the end.

    .venv/bin/python bench/chunking.py --mib 256 [--keep-archives DIR]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from blake3 import blake3
from pyfastcdc import FastCDC

from stasis.testbed.cluster import Cluster, Host
from stasis.testbed.images import WORKLOAD_IMAGE

KiB, MiB = 1 << 10, 1 << 20
CHECKPOINTS = 3


# --- chunkers: each maps an archive path to the byte ranges it cuts, as memoryviews ----------------

def _mapped(path: str) -> memoryview:
    # Every chunker reads through an mmap, so the throughput compares cutting and hashing, not I/O.
    # The map is closed by the garbage collector once the last chunk view is dropped.
    with open(path, "rb") as f:
        return memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))


def _fixed(view: memoryview, start: int, end: int, size: int) -> Iterator[memoryview]:
    for off in range(start, end, size):
        yield view[off:min(off + size, end)]


def fixed_chunker(size: int) -> Callable[[str], Iterator[memoryview]]:
    def cut(path: str) -> Iterator[memoryview]:
        view = _mapped(path)
        yield from _fixed(view, 0, len(view), size)
    return cut


def tar_member_chunker(size: int) -> Callable[[str], Iterator[memoryview]]:
    def cut(path: str) -> Iterator[memoryview]:
        # tarfile seeks past member data, so listing the members reads only the headers.
        with tarfile.open(path, "r:") as tar:
            spans = [(m.offset_data, m.size) for m in tar.getmembers() if m.isfile() and m.size]
        view = _mapped(path)
        pos = 0
        for offset, length in spans:
            yield from _fixed(view, pos, offset, size)           # headers and padding before the member
            yield from _fixed(view, offset, offset + length, size)
            pos = offset + length
        yield from _fixed(view, pos, len(view), size)            # end-of-archive blocks
    return cut


def fastcdc_chunker(avg: int) -> Callable[[str], Iterator[memoryview]]:
    cdc = FastCDC(avg, min_size=avg // 4, max_size=avg * 4)

    def cut(path: str) -> Iterator[memoryview]:
        # cut_file mmaps the file; chunk.data points into that map, so no copy is needed.
        for chunk in cdc.cut_file(path):
            yield chunk.data
    return cut


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _size_exact(n: float) -> str:
    return f"{n / MiB:.2f} MiB" if n >= MiB else f"{n / KiB:.1f} KiB"


CHUNKERS: dict[str, Callable[[str], Iterator[memoryview]]] = {
    **{f"fastcdc avg {_size(s)}": fastcdc_chunker(s) for s in (64 * KiB, 256 * KiB, 1 * MiB)},
    **{f"fixed {_size(s)}": fixed_chunker(s) for s in (4 * KiB, 64 * KiB, 1 * MiB)},
    **{f"tar-member fixed {_size(s)}": tar_member_chunker(s) for s in (4 * KiB, 64 * KiB, 1 * MiB)},
}


# --- measurement -------------------------------------------------------------------------------------

@dataclass
class Result:
    chunks: list[int] = field(default_factory=list)      # per archive
    new_bytes: list[int] = field(default_factory=list)   # per archive: unique chunks no earlier archive had
    seconds: float = 0.0                                 # cutting + hashing + index lookup, all archives


def measure(cut: Callable[[str], Iterator[memoryview]], archives: list[str]) -> Result:
    seen: set[bytes] = set()   # the repository's chunk index
    res = Result()
    for path in archives:
        chunks = new = 0
        t0 = time.perf_counter()
        for data in cut(path):
            chunks += 1
            digest = blake3(data).digest()
            if digest not in seen:   # also counts a chunk repeated inside one archive only once
                seen.add(digest)
                new += len(data)
        res.seconds += time.perf_counter() - t0
        res.chunks.append(chunks)
        res.new_bytes.append(new)
    return res


# --- real checkpoints --------------------------------------------------------------------------------

def start_placeholder(host: Host) -> None:
    """A process holding a mount namespace with the host's podman state, for Host.podman to enter.

    Stands in for the agent, which is not needed here. The namespace is ready once the shell has
    mounted the state folders and exec'd `sleep`.
    """
    host.proc = subprocess.Popen(Cluster.in_host_namespace(host, ["sleep", "infinity"]))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if host.proc.poll() is not None:
            raise RuntimeError(f"mount namespace setup failed (exit {host.proc.returncode})")
        with open(f"/proc/{host.proc.pid}/cmdline", "rb") as f:
            if f.read().split(b"\0")[0] == b"sleep":
                return
        time.sleep(0.05)
    raise TimeoutError("mount namespace setup did not finish")


def take_checkpoints(host: Host, name: str, mib: int, out_dir: str) -> list[str]:
    host.import_image(WORKLOAD_IMAGE)
    host.run_workload(name, mib, compressible_percent=50)
    archives = []
    for i in range(CHECKPOINTS):
        if i:
            host.mutate_memory(name)
        path = os.path.join(out_dir, f"ckpt{i + 1}.tar")
        t0 = time.monotonic()
        host.podman("container", "checkpoint", name, "--export", path, "--compress", "none",
                    "--leave-running", timeout=1800)
        archives.append(path)
        print(f"checkpoint {i + 1}: {os.path.getsize(path) / MiB:.1f} MiB in {time.monotonic() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return archives


def stop_placeholder(host: Host, name: str) -> None:
    if host.proc is None or host.proc.poll() is not None:
        return
    # The container's conmon lives in the namespace: remove the container before ending it.
    host.podman("rm", "-f", "-t", "0", name, check=False)
    host.proc.terminate()
    try:
        host.proc.wait(15)
    except subprocess.TimeoutExpired:
        host.proc.kill()
        host.proc.wait()


# --- report ------------------------------------------------------------------------------------------

def report(mib: int, sizes: list[int], results: dict[str, Result], total_seconds: float) -> None:
    print(f"\nchunking of {len(sizes)} successive checkpoints of memhold holding {mib} MiB (50% compressible), "
          f"5% of pages rewritten between two checkpoints")
    print("archive sizes: " + ", ".join(f"ckpt{i + 1} {s / MiB:.1f} MiB ({s} B)" for i, s in enumerate(sizes)))
    print(f"{'chunker':26}{'chunks':>9}{'mean':>11}"
          + "".join(f"{f'new ckpt{i + 1}':>14}{'%':>7}" for i in range(1, len(sizes))) + f"{'MB/s':>9}")
    for label, r in results.items():
        row = f"{label:26}{r.chunks[0]:>9}{_size_exact(sizes[0] / r.chunks[0]):>11}"
        for i in range(1, len(sizes)):
            row += f"{r.new_bytes[i] / MiB:>10.1f} MiB{100 * r.new_bytes[i] / sizes[i]:>7.2f}"
        print(row + f"{sum(sizes) / r.seconds / 1e6:>9.0f}")
    print(json.dumps({
        "mib": mib, "archive_bytes": sizes, "total_seconds": round(total_seconds, 1),
        "chunkers": {label: {
            "chunks": r.chunks, "new_bytes": r.new_bytes,
            "new_percent": [round(100 * n / s, 3) for n, s in zip(r.new_bytes, sizes, strict=True)],
            "mb_per_s": round(sum(sizes) / r.seconds / 1e6, 1)} for label, r in results.items()},
    }))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="memory the workload holds (default 256)")
    parser.add_argument("--keep-archives", metavar="DIR", help="write the checkpoint archives here and keep them")
    args = parser.parse_args()
    t_start = time.monotonic()
    base = tempfile.mkdtemp(prefix="chunkbench-")
    out_dir = args.keep_archives or os.path.join(base, "archives")
    os.makedirs(out_dir, exist_ok=True)
    host = Host("bench", os.path.join(base, "host"), 0)   # no agent, so no port
    name = "chunkbench"
    try:
        try:
            start_placeholder(host)
            archives = take_checkpoints(host, name, args.mib, out_dir)
        except subprocess.CalledProcessError as e:
            print(f"{' '.join(e.cmd)} failed: {e.stderr}", file=sys.stderr)
            raise
        finally:
            stop_placeholder(host, name)
        results = {}
        for label, cut in CHUNKERS.items():
            results[label] = measure(cut, archives)
            print(f"{label}: {results[label].seconds:.1f} s", file=sys.stderr, flush=True)
        report(args.mib, [os.path.getsize(p) for p in archives], results, time.monotonic() - t_start)
    finally:
        shutil.rmtree(base, ignore_errors=True)   # the overlay mounts went away with the namespace
    return 0


if __name__ == "__main__":
    sys.exit(main())
