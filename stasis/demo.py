"""`make demo`: two hosts, a stateful container, a live migration, and proof its memory survived.

Starts SeaweedFS (S3) on loopback, a controller and two agents ("host-a", "host-b", each in its own
mount namespace with its own podman store), runs the memhold workload on host-a holding
STASIS_DEMO_MIB MiB (default 256) in a known pattern, migrates it to host-b through the CLI, checks
the memory word by word on host-b, prints the timings, and stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from stasis.testbed.cluster import Cluster
from stasis.testbed.images import WORKLOAD_IMAGE
from stasis.testbed.seaweed import SeaweedFS


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def shell(cluster: Cluster, *args: str) -> str:
    print(f"$ stasis {' '.join(args)}", flush=True)
    out = cluster.cli(*args).stdout
    print(out.rstrip(), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stasis.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=int(os.environ.get("STASIS_DEMO_MIB", "256")))
    parser.add_argument("--repo", choices=["s3", "file"], default=os.environ.get("STASIS_DEMO_REPO", "s3"))
    parser.add_argument("--runtime", choices=["podman", "docker"],
                        default=os.environ.get("STASIS_DEMO_RUNTIME", "podman"),
                        help="engine of both hosts (docker: each host runs its own dockerd)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("demo: must run as root (CRIU and mount namespaces need it)", file=sys.stderr)
        return 1

    base = tempfile.mkdtemp(prefix="stasis-demo-", dir="/var/tmp")
    seaweed = None
    cluster = None
    try:
        if args.repo == "s3":
            step("starting SeaweedFS (S3) on loopback")
            seaweed = SeaweedFS(os.path.join(base, "seaweedfs")).start()
            repo, env = "s3://stasis-demo/repo", seaweed.env
            print(f"S3 endpoint {seaweed.endpoint}, repository {repo}")
        else:
            repo, env = f"file://{base}/repo", {}
        step(f"starting a controller and two {args.runtime} hosts, each with its own container store")
        cluster = Cluster(base, repo, env)
        cluster.start_controller()
        a, b = cluster.add_host("host-a", runtime=args.runtime), cluster.add_host("host-b", runtime=args.runtime)
        cluster.wait_hosts_up(["host-a", "host-b"])
        shell(cluster, "hosts")

        step(f"host-a: running 'web', which holds {args.mib} MiB in a pattern only it knows")
        a.import_image(WORKLOAD_IMAGE)
        a.run_workload("web", args.mib)
        time.sleep(1)
        shell(cluster, "ps")
        before = a.status("web")
        print(f"web on host-a: nonce={before['nonce']} counter={before['counter']} "
              f"(host-b has the image: {b.podman('image', 'inspect', WORKLOAD_IMAGE, check=False).returncode == 0})")

        step("migrating host-a/web to host-b")
        started = time.monotonic()
        shell(cluster, "migrate", "host-a/web", "--to", "host-b")
        wall = time.monotonic() - started
        job = cluster.cli_json("job", _last_job(cluster))

        step("proof: the container on host-b has host-a's memory")
        after = b.verify_memory("web", timeout=120)
        lines = len(b.exec("web", "cat", "/data/new/log").split())
        print(f"web on host-b: nonce={after['nonce']} counter={after['counter']} "
              f"memory check of {after['mib']} MiB: {after['verified']}")
        print(f"open file /data/new/log (created after start, in a new directory) has {lines} lines "
              f"and keeps growing")
        print(f"host-a containers: {[c['Names'][0] for c in a.containers()] or 'none'}")
        ok = (after["nonce"] == before["nonce"] and after["verified"] == "ok"
              and int(after["counter"]) >= int(before["counter"]))

        step("timings (seconds)")
        t = job["timings"]
        rows = [("downtime (freeze on host-a -> running on host-b)", job["downtime_seconds"])]
        rows += [(k, v) for k, v in t.items()]
        rows.append(("migrate command, wall clock", wall))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v:8.3f}")
        back = None
        if args.runtime == "podman" and ok:
            step("and back to host-a with --post-copy: it runs there before its memory has arrived")
            shell(cluster, "migrate", "host-b/web", "--to", "host-a", "--post-copy")
            back = cluster.cli_json("job", _last_job(cluster))
            home = a.verify_memory("web", timeout=120)
            print(f"web on host-a: nonce={home['nonce']} counter={home['counter']} "
                  f"memory check of {home['mib']} MiB: {home['verified']}; downtime {back['downtime_seconds']:.2f} s, "
                  f"memory followed in {back['timings'].get('pages', 0):.2f} s")
            ok = home["nonce"] == before["nonce"] and home["verified"] == "ok"
        print(json.dumps({"demo_mib": args.mib, "runtime": args.runtime, "downtime_seconds": job["downtime_seconds"],
                          "timings": t, "post_copy_downtime_seconds": back and back["downtime_seconds"],
                          "memory_intact": ok}))
        if not ok:
            print("demo: FAILED: state did not survive", file=sys.stderr)
            return 1
        print("\ndemo: OK: in-memory state survived the migration")
        return 0
    finally:
        step("stopping everything the demo started")
        if cluster is not None:
            cluster.stop()
        if seaweed is not None:
            seaweed.stop()
        shutil.rmtree(base, ignore_errors=True)


def _last_job(cluster: Cluster) -> str:
    return cluster.cli_json("jobs")[0]["id"]


if __name__ == "__main__":
    sys.exit(main())
