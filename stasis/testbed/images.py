"""Test images built locally (no registry is reachable): busybox, plus the static memhold workload."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("STASIS_TESTBED_CACHE", "/var/cache/stasis-testbed")
WORKLOAD_IMAGE = "localhost/stasis-memhold:1"
BUSYBOX = "/bin/busybox"


def _memhold_binary() -> str:
    src = os.path.join(HERE, "memhold.c")
    digest = hashlib.sha256(open(src, "rb").read()).hexdigest()[:12]
    out = os.path.join(CACHE, f"memhold-{digest}")
    if not os.path.exists(out):
        os.makedirs(CACHE, exist_ok=True)
        tmp = out + ".tmp"
        subprocess.run(["gcc", "-static", "-O2", "-o", tmp, src], check=True)
        os.rename(tmp, out)
    return out


def rootfs_tar(with_workload: bool) -> str:
    """A root filesystem tarball: busybox-static with its applets, optionally /bin/memhold."""
    if not os.path.exists(BUSYBOX):
        raise RuntimeError("busybox-static is missing: run 'make provision'")
    name = "memhold" if with_workload else "busybox"
    extra = _memhold_binary() if with_workload else ""
    key = hashlib.sha256(open(BUSYBOX, "rb").read() + extra.encode()).hexdigest()[:12]
    out = os.path.join(CACHE, f"rootfs-{name}-{key}.tar")
    if os.path.exists(out):
        return out
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory() as root:
        for d in ("bin", "tmp", "proc", "sys", "dev", "etc", "data", "var", "run"):
            os.makedirs(os.path.join(root, d))
        shutil.copy2(BUSYBOX, os.path.join(root, "bin/busybox"))
        applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
        for a in applets:
            if a != "busybox":
                os.symlink("busybox", os.path.join(root, "bin", a))
        if with_workload:
            shutil.copy2(extra, os.path.join(root, "bin/memhold"))
        with open(os.path.join(root, "etc/passwd"), "w") as f:
            f.write("root:x:0:0:root:/:/bin/sh\n")
        tmp = out + ".tmp"
        with tarfile.open(tmp, "w") as tar:
            tar.add(root, arcname=".")
        os.rename(tmp, out)
    return out
