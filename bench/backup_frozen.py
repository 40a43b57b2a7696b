"""Benchmark: how long a scheduled backup freezes a container, next to podman's own
`checkpoint --leave-running`, and how long each backup takes, first and second.

One host (its own podman store), SeaweedFS on loopback, memhold holding --mib MiB (half
compressible). Per round, two stasis backups through `stasis schedule run` with 5 % of the pages
rewritten in between (frozen time from CRIU's statistics in the backup record; wall time of the
backup job). Podman's own `container checkpoint --leave-running --print-stats` is measured under
the same conditions: a container's first checkpoint freezes it for less time than later ones, so
the first backup is compared with podman's first checkpoint of a twin container, and the second
backup with a podman checkpoint of the same container taken just before it. Medians of --rounds.

    .venv/bin/python bench/backup_frozen.py --mib 1024 --rounds 3
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
from datetime import datetime

from stasis.testbed.cluster import Cluster
from stasis.testbed.images import WORKLOAD_IMAGE
from stasis.testbed.seaweed import SeaweedFS


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_backup(cluster: Cluster, schedule: str) -> dict:
    before = {j["id"] for j in cluster.cli_json("jobs")}
    started = time.monotonic()
    [job_id] = cluster.cli_json("schedule", "run", schedule)["jobs"]
    assert job_id not in before
    job = cluster.cli_json("job", job_id, "--watch")
    wall = time.monotonic() - started
    assert job["state"] == "succeeded", job["error"]
    backup = cluster.cli_json("checkpoints", job["result"]["checkpoint_id"])
    return {"frozen": backup["timings"].get("frozen", 0.0), "wall": wall,
            "checkpoint_phase": job["timings"].get("checkpoint", 0.0), "new_bytes": backup["new_bytes"]}


def podman_frozen(host, name: str) -> float:
    os.sync()
    out = host.podman("container", "checkpoint", "--leave-running", "--print-stats", name, timeout=1800).stdout
    return json.loads(out)["container_statistics"][0]["criu_statistics"]["frozen_time"] / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="stasis-bench-backup-", dir="/var/tmp")
    seaweed = SeaweedFS(os.path.join(base, "seaweedfs")).start()
    cluster = Cluster(base, "s3://stasis-bench-backup/repo", seaweed.env)
    rows: dict[str, list[float]] = {k: [] for k in ("podman frozen 1", "first frozen", "first wall",
                                                    "podman frozen 2", "second frozen", "second wall",
                                                    "second new MiB")}
    try:
        cluster.start_controller()
        a = cluster.add_host("host-a")
        cluster.wait_hosts_up(["host-a"])
        a.import_image(WORKLOAD_IMAGE)
        for r in range(args.rounds):
            name, twin = f"bench-{r}", f"twin-{r}"
            a.run_workload(twin, args.mib, compressible_percent=50)
            time.sleep(0.5)
            rows["podman frozen 1"].append(podman_frozen(a, twin))   # a first checkpoint, like stasis' first
            a.podman("rm", "-f", "-t", "0", twin)
            a.run_workload(name, args.mib, compressible_percent=50)
            time.sleep(0.5)
            cluster.cli("schedule", "create", f"s{r}", "--selector", f"host-a/{name}", "--every", "24h",
                        "--keep-last", "10")
            os.sync()
            first = run_backup(cluster, f"s{r}")
            a.mutate_memory(name)
            rows["podman frozen 2"].append(podman_frozen(a, name))
            second = run_backup(cluster, f"s{r}")
            rows["first frozen"].append(first["frozen"])
            rows["first wall"].append(first["wall"])
            rows["second frozen"].append(second["frozen"])
            rows["second wall"].append(second["wall"])
            rows["second new MiB"].append(second["new_bytes"] / 2**20)
            a.podman("rm", "-f", "-t", "0", name)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), file=sys.stderr)
    finally:
        cluster.stop()
        seaweed.stop()
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nbackups of a running container holding {args.mib} MiB (half compressible), SeaweedFS on "
          f"loopback; median of {args.rounds} rounds, seconds")
    p1, p2 = med["podman frozen 1"], med["podman frozen 2"]
    print(f"first backup:  podman --leave-running frozen {p1:.3f}; stasis frozen {med['first frozen']:.3f} "
          f"({med['first frozen'] / p1:.2f}x), stasis wall {med['first wall']:.2f}")
    print(f"second backup: podman --leave-running frozen {p2:.3f}; stasis frozen {med['second frozen']:.3f} "
          f"({med['second frozen'] / p2:.2f}x), stasis wall {med['second wall']:.2f}, "
          f"new {med['second new MiB']:.1f} MiB")
    print(json.dumps({"mib": args.mib, "median": med}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
