"""Benchmark: the repository's write and read paths against plain boto3 on the same bytes.

Real checkpoints of a container holding --mib MiB (half of its pages compressible), taken with
podman (`checkpoint --export --compress none --leave-running`), twice, with 5 % of the pages
rewritten in between. Against one SeaweedFS on loopback, in one run, side by side:

  1. first checkpoint write: `Repository.store_file` (chunk, keyed-hash, compress, encrypt, pack,
     upload) vs boto3 `upload_file` (multipart, 8 MiB parts, 8 threads) of the same archive;
  2. second checkpoint: new bytes stored and wall time, as shares of the first;
  3. restore read path: `Repository.fetch_file` (download, authenticate, decompress, re-hash,
     write) vs boto3 `download_file` (8 threads) of the same archive;
  4. peak resident memory of each stasis step (each runs in a child process; ru_maxrss).

Run as root (podman, CRIU):  .venv/bin/python bench/repository_throughput.py --mib 1024
Figures are medians of --rounds; the machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import boto3
from boto3.s3.transfer import TransferConfig

from child import run_child as child_process

from stasis.testbed.cluster import Cluster, Host
from stasis.testbed.images import WORKLOAD_IMAGE
from stasis.testbed.seaweed import SeaweedFS

PASSWORD = "bench-password"


def child(argv: list[str]) -> None:
    """One stasis step in this (child) process, so its peak memory is its own."""
    from stasis.storage.manifest import Artifact
    from stasis.storage.repository import Repository

    step, url, path = argv[0], argv[1], argv[2]
    repo = Repository.open(url, PASSWORD)
    started = time.monotonic()
    if step == "store":
        art = repo.store_file(path)
        out = {"artifact": art.to_json()}
    else:
        art = Artifact.from_json(json.loads(open(argv[3]).read())["artifact"], "bench")
        repo.fetch_file(art, path)
        out = {}
    out["seconds"] = time.monotonic() - started
    print(json.dumps(out))


def run_child(*args: str) -> tuple[dict, int]:
    return child_process(__file__, *args)


def packs_bytes(s3, bucket: str) -> int:
    total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="repo/packs/"):
        total += sum(o["Size"] for o in page.get("Contents", []))
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0

    base = tempfile.mkdtemp(prefix="stasis-bench-repo-", dir="/var/tmp")
    seaweed = SeaweedFS(os.path.join(base, "seaweedfs")).start()
    os.environ.update(seaweed.env)
    host = Host("bench", os.path.join(base, "host"), 0)
    host.proc = subprocess.Popen(Cluster.in_host_namespace(host, ["sleep", "infinity"]))
    s3 = boto3.client("s3")
    cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)
    rows: dict[str, list[float]] = {k: [] for k in (
        "boto3 upload s", "stasis first write s", "stasis second write s", "boto3 download s",
        "stasis read s", "second new stored %", "first stored / archive %")}
    rss = {"store": 0, "fetch": 0}
    try:
        time.sleep(0.5)
        host.import_image(WORKLOAD_IMAGE)
        host.run_workload("bench", args.mib, compressible_percent=50)
        archives = []
        for i in range(2):
            if i:
                host.mutate_memory("bench")
            path = os.path.join(base, f"ckpt{i}.tar")
            host.podman("container", "checkpoint", "bench", "--export", path, "--compress", "none",
                        "--leave-running", timeout=1800)
            archives.append(path)
        size = os.path.getsize(archives[0])
        s3.create_bucket(Bucket="bench-plain")
        for r in range(args.rounds):
            bucket = f"bench-repo-{r}"
            url = f"s3://{bucket}/repo"
            from stasis.storage.repository import Repository
            Repository.init(url, PASSWORD)

            t = time.monotonic()
            s3.upload_file(archives[0], "bench-plain", f"a{r}", Config=cfg)
            rows["boto3 upload s"].append(time.monotonic() - t)
            first, mem = run_child("store", url, archives[0])
            rss["store"] = max(rss["store"], mem)
            rows["stasis first write s"].append(first["seconds"])
            stored_first = packs_bytes(s3, bucket)
            second, mem = run_child("store", url, archives[1])
            rss["store"] = max(rss["store"], mem)
            rows["stasis second write s"].append(second["seconds"])
            rows["second new stored %"].append(100 * (packs_bytes(s3, bucket) - stored_first) / stored_first)
            rows["first stored / archive %"].append(100 * stored_first / size)

            out = os.path.join(base, "restored.tar")
            t = time.monotonic()
            s3.download_file("bench-plain", f"a{r}", out, Config=cfg)
            rows["boto3 download s"].append(time.monotonic() - t)
            art_file = os.path.join(base, "artifact.json")
            with open(art_file, "w") as f:
                json.dump(first, f)
            fetched, mem = run_child("fetch", url, out, art_file)
            rss["fetch"] = max(rss["fetch"], mem)
            rows["stasis read s"].append(fetched["seconds"])
            assert open(out, "rb").read(1 << 20) == open(archives[0], "rb").read(1 << 20)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), file=sys.stderr)
    finally:
        host.podman("rm", "-f", "-t", "0", "bench", check=False)
        host.proc.terminate()
        host.proc.wait()
        seaweed.stop()
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in rows.items()}
    mb = size / 1e6
    print(f"\ncheckpoint archive of a container holding {args.mib} MiB (half compressible): {mb:.0f} MB; "
          f"SeaweedFS on loopback; median of {args.rounds} rounds")
    print(f"{'':34}{'seconds':>10}{'MB/s':>10}{'ratio':>8}")
    up, w1 = med["boto3 upload s"], med["stasis first write s"]
    down, rd = med["boto3 download s"], med["stasis read s"]
    print(f"{'boto3 multipart upload':34}{up:>10.2f}{mb / up:>10.0f}")
    print(f"{'stasis first checkpoint write':34}{w1:>10.2f}{mb / w1:>10.0f}{up / w1:>8.2f}  (target >= 0.9)")
    print(f"{'stasis second checkpoint write':34}{med['stasis second write s']:>10.2f}"
          f"{mb / med['stasis second write s']:>10.0f}{med['stasis second write s'] / w1:>8.2f}  "
          f"(of the first; target <= 0.3)")
    print(f"{'boto3 download':34}{down:>10.2f}{mb / down:>10.0f}")
    print(f"{'stasis read (restore path)':34}{rd:>10.2f}{mb / rd:>10.0f}{down / rd:>8.2f}  (target >= 0.9)")
    print(f"first checkpoint stored: {med['first stored / archive %']:.1f}% of the archive (dedup + zstd)")
    print(f"second checkpoint new stored bytes: {med['second new stored %']:.1f}% of the first (target <= 10%)")
    print(f"peak RSS: store {rss['store'] / 2**20:.0f} MiB, fetch {rss['fetch'] / 2**20:.0f} MiB")
    print(json.dumps({"mib": args.mib, "archive_bytes": size, "median": med,
                      "peak_rss": rss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
