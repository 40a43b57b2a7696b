"""Small helpers shared by the end-to-end test files."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

# A destination armed so that its agent can be killed after its runtime restored the copy and before
# it reports it (the pause leaves time to see the copy run).
LATE = {"STASIS_FAILPOINTS": "restore.pause_after_runtime", "STASIS_FAILPOINT_PAUSE": "15"}


def name(prefix: str) -> str:
    """A container name no other test uses (hosts are shared by a whole test session)."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def one_error_line(stderr: str) -> str:
    """Errors are exactly one line (progress lines before it are fine), never a traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("stasis: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def log_lines(host, container: str) -> int:
    """Lines memhold appended to the file it keeps open in a directory it created after start."""
    return len(host.exec(container, "cat", "/data/new/log").split())


def migrate_killing_the_destination_once_its_copy_runs(cluster, source: str, dst, container: str) -> dict:
    """Migrate `container` from host `source` to `dst` (started with LATE) and SIGKILL dst's agent
    once its copy runs; the job as `migrate --json` printed it."""
    from stasis.testbed.cluster import stasis_argv

    proc = subprocess.Popen([*stasis_argv(), "--controller", cluster.controller_address, "migrate",
                             f"{source}/{container}", "--to", dst.name, "--json"], env=cluster.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(c["Names"][0] == container and c["State"] == "running" for c in dst.containers()):
            assert time.monotonic() < deadline and proc.poll() is None, proc.poll() is not None and proc.communicate()
            time.sleep(0.05)
        dst.proc.kill()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return json.loads(out)


def wait_gone(host, container: str, explain=lambda: "", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while container in [c["Names"][0] for c in host.containers()]:
        assert time.monotonic() < deadline, f"{container} is still on {host.name}. {explain()}"
        time.sleep(0.2)
