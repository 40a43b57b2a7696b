"""Benchmark: migration downtime, stasis against the scripted way and against CRIU's own floor.

Rows, all in one run on the same machine, the same SeaweedFS and the same workload (memhold holding
MiB of memory, half of it compressible), the image already on both hosts:

- podman export + S3 + import (what people script today): `podman container checkpoint --export
  X.tar --compress none`, a boto3 multipart upload, a boto3 download on the destination, and
  `podman container restore --import X.tar`. The container is down for all of it.
- local floor: `podman container checkpoint` and `podman container restore` of the same container
  on one host, with no export. This is CRIU's own dump and restore and nothing else.
- stasis direct: `stasis migrate` (agent to agent over mutual TLS, the default). The archive's
  bytes take the source's bulk channel (plain TLS beside gRPC).
- stasis direct, bytes on gRPC: the same from a source agent started with `--bulk-listen off`, so
  every byte travels in gRPC messages: what the bulk channel saves.
- stasis via repository: `stasis migrate --via-repository` (through the encrypted S3 repository,
  leaving a backup).
- stasis post-copy: `stasis migrate --post-copy` (restore first; memory follows through the agents'
  relay). Its "transfer" column is the copy of memory after the container already runs ("pages"),
  which is not downtime.

Downtime runs, in every row alike, from the moment CRIU freezes the container (its first process
turns traced: stasis.agent.freeze) to the moment CRIU's restore resumes the processes (the marker
CRIU's action script leaves, scripts/criu/actions.sh). podman's and runc's work before the freeze
and after the resume are not downtime, for podman's rows as for stasis's. Every row starts after a
sync, with no dirty data left by the row before. Figures are medians over the rounds; these
machines are shared and noisy, so read the ratios.

Both "hosts" share this machine's two vCPUs and its disk, which a direct migration feels and the
floor does not. CRIU's dump (one thread writing memory into page cache) took 0.5-1.0 s a GiB alone
and 1.7-2.1 s beside the transfer (the source's read, hash and TLS; the destination's TLS, hash
and write), which in real use runs on the other host. A filesystem sync on the source (podman's
overlay unmount) also stalls the destination's fsyncs, as it would not across two disks.

    python bench/migrate_vs_podman.py [--mib 64 1024 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import boto3
from boto3.s3.transfer import TransferConfig

from stasis.agent import freeze
from stasis.agent.podman import LAZY_REQUESTS
from stasis.testbed.cluster import Cluster
from stasis.testbed.images import WORKLOAD_IMAGE
from stasis.testbed.seaweed import SeaweedFS

COLUMNS = ["dump", "transfer", "restore", "downtime"]


class Moment(threading.Thread):
    """The first moment `happened()` holds, polled every millisecond (as the agent polls)."""

    def __init__(self, happened, *leftover: str):
        super().__init__(daemon=True)
        self.happened, self.leftover, self.at, self.stopped = happened, leftover, None, False
        self.start()

    def run(self) -> None:
        while not self.stopped and self.at is None:
            if self.happened():
                self.at = time.monotonic()
            time.sleep(0.001)

    def when(self) -> float:
        self.stopped = True
        self.join()
        for leftover in self.leftover:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        if self.at is None:
            raise RuntimeError("the moment was never seen: is the stasis runc wrapper (version 4) installed?")
        return self.at


def frozen(host, name: str) -> tuple[str, Moment]:
    """The container's id, and when CRIU seizes its first process."""
    c = json.loads(host.podman("inspect", "--format", "json", name).stdout)[0]
    pid = freeze.container_pid(c)
    return c["Id"], Moment(lambda: freeze.tracer(pid) != 0)


def resumed(cid: str) -> Moment:
    """When CRIU resumes container `cid`'s processes (asks for the marker the agent uses)."""
    marker = os.path.join(LAZY_REQUESTS, f"{cid}.resumed")
    for leftover in (marker, os.path.join(LAZY_REQUESTS, f"{cid}.restored")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)
    os.makedirs(LAZY_REQUESTS, mode=0o700, exist_ok=True)
    with open(os.path.join(LAZY_REQUESTS, f"{cid}.mark"), "w") as f:
        f.write("0\n")
    return Moment(lambda: os.path.exists(marker), *(os.path.join(LAZY_REQUESTS, f"{cid}.{kind}")
                                                    for kind in ("mark", "resumed", "restored")))


BASELINE, FLOOR = "podman export + S3 + import", "local floor (podman, one host)"
DIRECT, REPO, POST = "stasis direct", "stasis via repository", "stasis post-copy"
GRPC = "stasis direct, bytes on gRPC"
SHORT = {BASELINE: "baseline", FLOOR: "floor", DIRECT: "direct", GRPC: "direct-grpc", REPO: "repo",
         POST: "post-copy"}
SOURCE = {GRPC: "host-g"}   # a source agent started with --bulk-listen off; every other row: host-a


def baseline(cluster: Cluster, seaweed: SeaweedFS, name: str, base: str) -> dict[str, float]:
    a, b = cluster.hosts["host-a"], cluster.hosts["host-b"]
    s3 = boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                      region_name="us-east-1")
    cfg = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=8)
    src, dst = os.path.join(base, f"{name}-src.tar"), os.path.join(base, f"{name}-dst.tar")
    cid, freezing = frozen(a, name)
    a.podman("container", "checkpoint", name, "--export", src, "--compress", "none", timeout=1800)
    t0, t1 = freezing.when(), time.monotonic()
    s3.upload_file(src, "bench-baseline", f"{name}.tar", Config=cfg)
    s3.download_file("bench-baseline", f"{name}.tar", dst, Config=cfg)
    t2 = time.monotonic()
    running = resumed(cid)
    b.podman("container", "restore", "--import", dst, timeout=1800)   # no --name: it keeps its id
    t3 = running.when()
    assert b.verify_memory(name, timeout=300)["verified"] == "ok"
    for path in (src, dst):
        os.unlink(path)
    return {"dump": t1 - t0, "transfer": t2 - t1, "restore": t3 - t2, "downtime": t3 - t0}


def floor(cluster: Cluster, name: str) -> dict[str, float]:
    a = cluster.hosts["host-a"]
    cid, freezing = frozen(a, name)
    a.podman("container", "checkpoint", name, timeout=1800)
    t0, t1 = freezing.when(), time.monotonic()
    running = resumed(cid)
    a.podman("container", "restore", name, timeout=1800)
    t2 = running.when()
    assert a.verify_memory(name, timeout=300)["verified"] == "ok"
    return {"dump": t1 - t0, "transfer": 0.0, "restore": t2 - t1, "downtime": t2 - t0}


def stasis(cluster: Cluster, name: str, *extra: str, source: str = "host-a") -> dict[str, float]:
    job = cluster.cli_json("migrate", f"{source}/{name}", "--to", "host-b", *extra)
    assert job["state"] == "succeeded", job["error"]
    assert cluster.hosts["host-b"].verify_memory(name, timeout=300)["verified"] == "ok"
    t = job["timings"]
    print("  phases: " + " ".join(f"{k}={v:.2f}" for k, v in t.items()), file=sys.stderr, flush=True)
    transfer = (t.get("destination.transfer", 0) + t.get("source.upload", 0) + t.get("destination.download", 0)
                + t.get("pages", 0))
    return {"dump": t.get("source.dump", 0), "transfer": transfer, "restore": t.get("destination.restore", 0),
            "downtime": job["downtime_seconds"]}


def run_size(cluster: Cluster, seaweed: SeaweedFS, base: str, mib: int, rounds: int,
             only: list[str]) -> dict[str, dict]:
    b = cluster.hosts["host-b"]
    methods = {BASELINE: lambda n: baseline(cluster, seaweed, n, base), FLOOR: lambda n: floor(cluster, n),
               DIRECT: lambda n: stasis(cluster, n), GRPC: lambda n: stasis(cluster, n, source=SOURCE[GRPC]),
               REPO: lambda n: stasis(cluster, n, "--via-repository"),
               POST: lambda n: stasis(cluster, n, "--post-copy")}
    methods = {label: m for label, m in methods.items() if SHORT[label] in only}
    results: dict[str, list[dict[str, float]]] = {label: [] for label in methods}
    for r in range(rounds):
        for i, (label, method) in enumerate(methods.items()):
            name = f"bench-{mib}-{r}-{i}"
            a = cluster.hosts[SOURCE.get(label, "host-a")]
            a.run_workload(name, mib, compressible_percent=50)
            # Every row starts with no dirty data left by the row before (the baseline writes GiBs):
            # otherwise whichever row follows it is throttled by that write-back, not by itself.
            os.sync()
            time.sleep(0.5)
            res = method(name)
            results[label].append(res)
            for host in (a, b):
                host.podman("rm", "-f", "-t", "0", name, check=False)
            print(f"{mib} MiB round {r + 1} {label}: downtime {res['downtime']:.2f} s", file=sys.stderr, flush=True)
    return {label: {c: statistics.median(row[c] for row in rows) for c in COLUMNS} for label, rows in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, nargs="+", default=[256])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(SHORT.values()), default=list(SHORT.values()),
                        help="rows to run (default: all; the ratios need baseline and floor)")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="stasis-bench-", dir="/var/tmp")
    seaweed = SeaweedFS(os.path.join(base, "seaweedfs")).start()
    cluster = Cluster(base, "s3://stasis-bench/repo", seaweed.env)
    table: dict[int, dict[str, dict]] = {}
    try:
        boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                     region_name="us-east-1").create_bucket(Bucket="bench-baseline")
        cluster.start_controller()
        hosts = [cluster.add_host("host-a"), cluster.add_host("host-b")]
        if "direct-grpc" in args.only:
            hosts.append(cluster.add_host(SOURCE[GRPC], extra_env={"STASIS_BULK_LISTEN": "off"}))
        cluster.wait_hosts_up([h.name for h in hosts])
        for host in hosts:
            host.import_image(WORKLOAD_IMAGE)
        for mib in args.mib:
            table[mib] = run_size(cluster, seaweed, base, mib, args.rounds, args.only)
    finally:
        cluster.stop()
        seaweed.stop()
        shutil.rmtree(base, ignore_errors=True)

    print(f"\nmigration downtime, memory half compressible, SeaweedFS on loopback; median of {args.rounds} "
          f"rounds, seconds")
    print(f"{'MiB':>6}  {'':32}" + "".join(f"{c:>10}" for c in COLUMNS) + f"{'/baseline':>11}{'/floor':>8}")
    for mib, rows in table.items():
        for label, row in rows.items():
            ratios = [f"{row['downtime'] / rows[ref]['downtime']:>{w}.2f}" if ref in rows else f"{'-':>{w}}"
                      for ref, w in ((BASELINE, 11), (FLOOR, 8))]
            print(f"{mib:>6}  {label:32}" + "".join(f"{row[c]:>10.2f}" for c in COLUMNS) + "".join(ratios))
    print(json.dumps({"rounds": args.rounds, "median": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
