"""Benchmark: moving a running container between two hosts through S3, stasis vs the scripted way.

Baseline (what people script today, and ENVIRONMENT.md measured): on the source
`podman container checkpoint --export X.tar --compress none`, boto3 multipart upload to S3, boto3
download on the destination, `podman container restore --import X.tar`. The container is down for
all of it. stasis: `stasis migrate host-a/NAME --to host-b` (downtime from the freeze to running).

Both run in the same session on the same machine, same SeaweedFS, same workload (memhold holding
--mib MiB of incompressible memory), the image already present on both hosts. Figures are medians of
--rounds rounds; these machines are shared and noisy, so read the ratio, not the absolute seconds.

    python bench/migrate_vs_podman.py [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import boto3
from boto3.s3.transfer import TransferConfig

from stasis.testbed.cluster import Cluster
from stasis.testbed.images import WORKLOAD_IMAGE
from stasis.testbed.seaweed import SeaweedFS


def baseline(cluster: Cluster, seaweed: SeaweedFS, name: str, base: str) -> dict[str, float]:
    a, b = cluster.hosts["host-a"], cluster.hosts["host-b"]
    s3 = boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)
    src, dst = os.path.join(base, f"{name}-src.tar"), os.path.join(base, f"{name}-dst.tar")
    t = {}
    t0 = time.monotonic()
    a.podman("container", "checkpoint", name, "--export", src, "--compress", "none", timeout=1800)
    t["dump"] = time.monotonic() - t0
    t1 = time.monotonic()
    s3.upload_file(src, "bench-baseline", f"{name}.tar", Config=cfg)
    t["upload"] = time.monotonic() - t1
    t2 = time.monotonic()
    s3.download_file("bench-baseline", f"{name}.tar", dst, Config=cfg)
    t["download"] = time.monotonic() - t2
    t3 = time.monotonic()
    b.podman("container", "restore", "--import", dst, "--name", name, timeout=1800)
    t["restore"] = time.monotonic() - t3
    t["downtime"] = time.monotonic() - t0
    assert b.verify_memory(name, timeout=120)["verified"] == "ok"
    for path in (src, dst):
        os.unlink(path)
    return t


def stasis(cluster: Cluster, name: str) -> dict[str, float]:
    job = cluster.cli_json("migrate", f"host-a/{name}", "--to", "host-b")
    assert job["state"] == "succeeded", job["error"]
    assert cluster.hosts["host-b"].verify_memory(name, timeout=120)["verified"] == "ok"
    t = job["timings"]
    return {"dump": t.get("source.dump", 0), "upload": t.get("source.upload", 0),
            "download": t.get("destination.download", 0), "restore": t.get("destination.restore", 0),
            "downtime": job["downtime_seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="stasis-bench-", dir="/var/tmp")
    seaweed = SeaweedFS(os.path.join(base, "seaweedfs")).start()
    cluster = Cluster(base, "s3://stasis-bench/repo", seaweed.env)
    results: dict[str, list[dict[str, float]]] = {"podman export + S3 + import": [], "stasis migrate": []}
    try:
        boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket="bench-baseline")
        cluster.start_controller()
        a, b = cluster.add_host("host-a"), cluster.add_host("host-b")
        cluster.wait_hosts_up(["host-a", "host-b"])
        a.import_image(WORKLOAD_IMAGE)
        b.import_image(WORKLOAD_IMAGE)
        for r in range(args.rounds):
            for label in results:
                name = f"bench-{r}-{'p' if label.startswith('podman') else 's'}"
                a.run_workload(name, args.mib)
                time.sleep(0.5)
                res = baseline(cluster, seaweed, name, base) if label.startswith("podman") else stasis(cluster, name)
                results[label].append(res)
                b.podman("rm", "-f", "-t", "0", name)
                a.podman("rm", "-f", "-t", "0", name, check=False)
                print(f"round {r + 1} {label}: downtime {res['downtime']:.2f} s", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
        seaweed.stop()
        shutil.rmtree(base, ignore_errors=True)

    cols = ["dump", "upload", "download", "restore", "downtime"]
    med = {label: {c: statistics.median(r[c] for r in rows) for c in cols} for label, rows in results.items()}
    print(f"\nmigration of a container holding {args.mib} MiB through S3 (SeaweedFS, loopback); "
          f"median of {args.rounds} rounds, seconds")
    print(f"{'':32}" + "".join(f"{c:>10}" for c in cols))
    for label, row in med.items():
        print(f"{label:32}" + "".join(f"{row[c]:>10.2f}" for c in cols))
    base_dt, ours = med["podman export + S3 + import"]["downtime"], med["stasis migrate"]["downtime"]
    print(f"downtime ratio stasis / baseline: {ours / base_dt:.2f}")
    print(json.dumps({"mib": args.mib, "rounds": args.rounds, "median": med, "ratio": ours / base_dt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
