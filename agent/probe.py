"""What this host can do: kernel, CRIU version and features, runtime version, CPU flags, space."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import tempfile

from stasis import __version__
from stasis.agent.process import run, tail
from stasis.errors import RuntimeFailure
from stasis.agent.runtime import Runtime

# Features that decide what kind of checkpoint and migration this host can take part in.
CRIU_FEATURES = ("mem_dirty_track", "uffd", "uffd-noncoop", "tcp_half_closed", "pidfd_store",
                 "network_lock_nftables")


# Our CRIU build keeps its kernel-probe cache here (scripts/provision.sh: RUNDIR). CRIU writes the
# cache only on a tmpfs; without it every CRIU run probes the kernel again (~40 ms here).
CRIU_RUNDIR = "/run/stasis/criu"


def fs_type(path: str) -> str:
    """The type of the filesystem `path` is on (its longest mount point in /proc/self/mounts)."""
    path, best, kind = os.path.realpath(path), "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fields[2]
    return kind


def criu_cache(folder: str = CRIU_RUNDIR) -> str:
    """Make CRIU's cache folder again if a reboot removed it (root only); "" if CRIU can cache its
    kernel probes there, else why not."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    kind = fs_type(folder)
    if kind != "tmpfs":
        return (f"{folder} is on {kind or 'an unknown filesystem'}, not a tmpfs: CRIU probes the kernel again in "
                f"every dump and restore (~40 ms of downtime each); run 'make provision' to mount one")
    return ""


async def criu_version(criu: str = "criu") -> str:
    if not shutil.which(criu):
        return ""
    out = await run([criu, "--version"], timeout=10, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return ""


async def cpuinfo_dump(work_dir: str, criu: str = "criu") -> bytes:
    """CRIU's description of this CPU (`criu cpuinfo dump`), for another host to check against."""
    with tempfile.TemporaryDirectory(prefix="cpuinfo-", dir=work_dir) as folder:
        out = await run([criu, "cpuinfo", "dump", "-D", folder], timeout=20, check=False)
        if out.returncode != 0:
            raise RuntimeFailure(f"criu cpuinfo dump failed: {tail(out.stderr)}")
        with open(os.path.join(folder, "cpuinfo.img"), "rb") as f:
            return f.read()


async def cpuinfo_check(image: bytes, work_dir: str, criu: str = "criu") -> str:
    """Why processes dumped on the CPU `image` describes cannot run here, or "" when they can."""
    with tempfile.TemporaryDirectory(prefix="cpuinfo-", dir=work_dir) as folder:
        with open(os.path.join(folder, "cpuinfo.img"), "wb") as f:
            f.write(image)
        out = await run([criu, "cpuinfo", "check", "-D", folder], timeout=20, check=False)
        return "" if out.returncode == 0 else (tail(out.stderr) or tail(out.stdout) or "incompatible CPU")


async def criu_feature(name: str, criu: str = "criu") -> bool:
    out = await run([criu, "check", "--feature", name], timeout=20, check=False)
    return out.returncode == 0


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


async def probe(host_name: str, runtime: Runtime, work_dir: str) -> dict:
    version = await criu_version()
    features: dict[str, bool] = {}
    if version:
        results = await asyncio.gather(*(criu_feature(f) for f in CRIU_FEATURES))
        features = dict(zip(CRIU_FEATURES, results, strict=True))
    try:
        runtime_version = await runtime.version()
    except Exception:  # noqa: BLE001 - a broken engine is reported as absent, not a crash
        runtime_version = ""
    os.makedirs(work_dir, exist_ok=True)
    engine: dict = {}
    if hasattr(runtime, "engine_info"):
        try:
            engine = await asyncio.to_thread(runtime.engine_info)
        except Exception:  # noqa: BLE001 - an unreachable engine is reported as absent
            engine = {}
    return {
        "engine_api_version": engine.get("engine_api_version", ""),
        "engine_experimental": bool(engine.get("engine_experimental", False)),
        "name": host_name, "agent_version": __version__, "kernel": platform.release(),
        "arch": platform.machine(), "runtime": runtime.name, "runtime_version": runtime_version,
        "criu_version": version, "criu_features": features, "cpu_flags": cpu_flags(),
        "work_free_bytes": shutil.disk_usage(work_dir).free,
        # Iterative pre-copy needs the kernel to track soft-dirty pages.
        "pre_copy_possible": features.get("mem_dirty_track", False),
    }
