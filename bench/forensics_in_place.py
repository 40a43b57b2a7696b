"""Benchmark: forensic questions answered in place from S3, against fetching the whole checkpoint first.

A podman checkpoint (`--export --compress none --leave-running`) of a container holding --mib MiB
(half of its pages compressible), with one changed file, stored in an encrypted stasis repository
on SeaweedFS (loopback). Each question is asked twice, from a freshly opened repository each time:

  in place:  Checkpoint.open(repo, id), which fetches only the chunks the question reads;
  whole:     Repository.fetch_file of the whole archive to local disk (what stasis did before, and
             what reading an archive with a local tool needs), then the same question on the file.

Printed side by side: seconds and MB loaded from the backend (manifest and index files included,
and the checkpoint's own data apart), medians of --rounds.

Run as root (podman, CRIU):  .venv/bin/python bench/forensics_in_place.py --mib 1024
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from stasis.testbed.cluster import Cluster, Host
from stasis.testbed.images import WORKLOAD_IMAGE
from stasis.testbed.seaweed import SeaweedFS

PASSWORD = "bench-password"

QUESTIONS = {
    "summary": lambda c: c.summary(),
    "ps --cmdline --env": lambda c: c.processes(cmdline=True, env=True),
    "files sockets mounts": lambda c: (c.files(), c.sockets(), c.mounts()),
    "fs (changed files)": lambda c: c.fs(),
    "dump-file": lambda c: c.dump_file("/tmp/bench-file", io.BytesIO()),
    "maps": lambda c: c.maps(),
    "grep (all memory)": lambda c: c.grep("not-in-the-memory-of-memhold"),
}


class CountingBackend:
    def __init__(self, inner):
        self.inner, self.loaded = inner, 0

    def load(self, key, offset=0, length=None):
        data = self.inner.load(key, offset, length)
        self.loaded += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.inner, name)


def ask(url: str, checkpoint_id: str, question, in_place: bool, scratch: str) -> tuple[float, int, int]:
    """(seconds, bytes loaded from the backend, of which the checkpoint's own data)"""
    from stasis.forensics.checkpoint import Checkpoint
    from stasis.storage.backend import open_backend
    from stasis.storage.repository import Repository

    backend = CountingBackend(open_backend(url))
    started = time.monotonic()
    repo = Repository.open(url, PASSWORD, backend=backend)
    if in_place:
        with Checkpoint.open(repo, checkpoint_id) as ckpt:
            question(ckpt)
            data = ckpt.fetched_bytes
    else:
        path = os.path.join(scratch, "whole.tar")
        artifact = repo.read_manifest(checkpoint_id).checkpoint
        before = backend.loaded
        repo.fetch_file(artifact, path)
        data = backend.loaded - before
        with Checkpoint.from_archive(path) as ckpt:
            question(ckpt)
        os.remove(path)
    return time.monotonic() - started, backend.loaded, data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    base = tempfile.mkdtemp(prefix="stasis-bench-fx-", dir="/var/tmp")
    seaweed = SeaweedFS(os.path.join(base, "seaweedfs")).start()
    os.environ.update(seaweed.env)
    host = Host("bench", os.path.join(base, "host"), 0)
    host.proc = subprocess.Popen(Cluster.in_host_namespace(host, ["sleep", "infinity"]))
    rows: dict[tuple[str, bool], list[tuple[float, int, int]]] = {}
    try:
        from stasis.storage.manifest import ContainerRef, Manifest
        from stasis.storage.repository import Repository, new_checkpoint_id, now_rfc3339

        time.sleep(0.5)
        host.import_image(WORKLOAD_IMAGE)
        host.run_workload("bench-fx", args.mib, compressible_percent=50)
        host.exec("bench-fx", "sh", "-c", "head -c 100000 /dev/urandom > /tmp/bench-file")
        archive = os.path.join(base, "ckpt.tar")
        host.podman("container", "checkpoint", "bench-fx", "--export", archive, "--compress", "none",
                    "--leave-running", timeout=1800)
        url = "s3://bench-forensics/repo"
        repo = Repository.init(url, PASSWORD)
        m = Manifest(id=new_checkpoint_id(), created=now_rfc3339(), host="bench", runtime="podman",
                     runtime_version="", criu_version="", container=ContainerRef("c" * 64, "bench-fx", "", "d" * 64),
                     leave_running=True, checkpoint=repo.store_file(archive), image=None, timings={}, criu_stats={})
        repo.write_manifest(m)
        for r in range(args.rounds):
            for name, question in QUESTIONS.items():
                for in_place in (True, False):
                    rows.setdefault((name, in_place), []).append(ask(url, m.id, question, in_place, base))
            print(f"round {r + 1} done", file=sys.stderr)
    finally:
        host.podman("rm", "-f", "-t", "0", "bench-fx", check=False)
        host.proc.terminate()
        host.proc.wait()
        seaweed.stop()
        size = os.path.getsize(os.path.join(base, "ckpt.tar")) if os.path.exists(os.path.join(base, "ckpt.tar")) else 0
        shutil.rmtree(base, ignore_errors=True)

    print(f"\ncheckpoint archive of a container holding {args.mib} MiB (half compressible): {size / 1e6:.0f} MB; "
          f"SeaweedFS on loopback; medians of {args.rounds} rounds")
    print(f"{'question':24}{'in place s':>11}{'whole s':>9}{'ratio':>7}{'in place MB':>12}{'(data)':>8}"
          f"{'whole MB':>10}{'share':>8}")
    for name in QUESTIONS:
        t_in, b_in, d_in = (statistics.median(r[i] for r in rows[(name, True)]) for i in range(3))
        t_whole, b_whole = (statistics.median(r[i] for r in rows[(name, False)]) for i in range(2))
        print(f"{name:24}{t_in:>11.2f}{t_whole:>9.2f}{t_in / t_whole:>7.2f}{b_in / 1e6:>12.2f}{d_in / 1e6:>8.2f}"
              f"{b_whole / 1e6:>10.1f}{100 * b_in / b_whole:>7.1f}%")
    print("in place MB: everything loaded, repository index and manifest included; (data): the checkpoint's "
          "own chunks among it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
