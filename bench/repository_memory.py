"""Benchmark: peak memory of storing and restoring a large artifact (the bound the format promises).

Makes a --gib GiB file (half random, half zero pages), stores it into a fresh encrypted repository
in a local folder, then restores it; each step runs in its own child process and its peak resident
set size (ru_maxrss) is printed. Goal: a 4 GiB checkpoint needs no more than a few hundred MiB.

    .venv/bin/python bench/repository_memory.py --gib 4 [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from child import run_child

PASSWORD = "bench-password"


def child(step: str, url: str, path: str, artifact: str) -> None:
    from stasis.storage.manifest import Artifact
    from stasis.storage.repository import Repository

    repo = Repository.open(url, PASSWORD)
    started = time.monotonic()
    if step == "store":
        with open(artifact, "w") as f:
            json.dump(repo.store_file(path).to_json(), f)
    else:
        with open(artifact) as f:
            repo.fetch_file(Artifact.from_json(json.load(f), "bench"), path)
    print(json.dumps({"seconds": time.monotonic() - started}))


def run(*args: str) -> tuple[float, int]:
    doc, rss = run_child(__file__, *args)
    return doc["seconds"], rss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=int, default=4)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from stasis.storage.repository import Repository

    base = tempfile.mkdtemp(prefix="stasis-bench-mem-", dir=args.dir)
    try:
        src = os.path.join(base, "artifact.bin")
        with open(src, "wb") as f:
            for _ in range(args.gib * 512):   # 1 MiB at a time: this process stays small too
                f.write(os.urandom(1 << 20))
            f.truncate(args.gib << 30)        # the second half: zero pages (a sparse tail)
        url = f"file://{base}/repo"
        Repository.init(url, PASSWORD)
        meta = os.path.join(base, "artifact.json")
        store_s, store_rss = run("store", url, src, meta)
        fetch_s, fetch_rss = run("fetch", url, os.path.join(base, "restored.bin"), meta)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{args.gib} GiB artifact (half random, half zero pages), encrypted local repository")
    print(f"store: {store_s:6.1f} s, peak RSS {store_rss / 2**20:5.0f} MiB")
    print(f"fetch: {fetch_s:6.1f} s, peak RSS {fetch_rss / 2**20:5.0f} MiB")
    print(json.dumps({"gib": args.gib, "store_seconds": store_s, "store_rss": store_rss,
                      "fetch_seconds": fetch_s, "fetch_rss": fetch_rss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
