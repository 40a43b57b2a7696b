"""Host probes that need no container engine: filesystem types, CRIU's kernel-probe cache folder."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from stasis.agent import probe


def test_fs_type_takes_the_longest_mount_point():
    assert probe.fs_type("/proc/self/status") == "proc"
    assert probe.fs_type("/dev/shm/not-there") == "tmpfs"


def test_criu_cache_folder_is_made_root_only_and_must_be_a_tmpfs(tmp_path):
    folder = tmp_path / "criu"
    why = probe.criu_cache(str(folder))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    kind = probe.fs_type(str(folder))
    assert (why == "") == (kind == "tmpfs")
    if why:
        assert "not a tmpfs" in why and "make provision" in why


def test_criu_cache_accepts_a_tmpfs(tmp_path):
    folder = tmp_path / "criu"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "stasis-test", str(folder)], check=True)
    try:
        assert probe.criu_cache(str(folder)) == ""
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_the_provisioned_criu_caches_its_kernel_probes():
    # Provisioning builds CRIU with this folder and mounts a tmpfs there when it is not one.
    if not os.path.isdir(probe.CRIU_RUNDIR):
        pytest.fail(f"{probe.CRIU_RUNDIR} is missing: run 'make provision'")
    assert probe.criu_cache() == ""
    subprocess.run(["criu", "check"], capture_output=True, check=False)
    assert os.path.exists(os.path.join(probe.CRIU_RUNDIR, "criu.kdat"))
