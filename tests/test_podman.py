"""Pure parts of the podman driver (the driver itself runs against real podman in test_e2e)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from stasis.agent.podman import _first_container_stats, check_name
from stasis.agent.process import run, tail
from stasis.errors import DeadlineExceeded, InvalidArgument, RuntimeFailure

STATS = """{"podman_checkpoint_duration": 253899, "container_statistics": [{"Id": "e121", "RawInput": "t1",
 "runtime_checkpoint_duration": 221937, "criu_statistics": {"freezing_time": 102465, "frozen_time": 74280,
 "memdump_time": 661, "memwrite_time": 146, "pages_scanned": 48, "pages_written": 34}}]}"""


def test_print_stats_are_parsed():
    s = _first_container_stats(STATS)
    assert s["Id"] == "e121" and s["criu_statistics"]["frozen_time"] == 74280
    assert _first_container_stats("not json") == {}


@pytest.mark.parametrize("name", ["web", "web-2", "a.b_c", "e121f462629289fa"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-rf", "a b", "../x", "x;rm", "a" * 200, "--all"])
def test_bad_names_never_reach_podman(name):
    with pytest.raises(InvalidArgument):
        check_name(name)


async def test_run_reports_tail_of_stderr():
    with pytest.raises(RuntimeFailure, match="boom"):
        await run(["sh", "-c", "echo one >&2; echo boom >&2; exit 3"])


async def test_run_times_out():
    with pytest.raises(DeadlineExceeded):
        await run(["sleep", "5"], timeout=0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_command_run_to_die_with_the_agent_is_killed_when_the_agent_is(tmp_path):
    """podman's restore must not finish unseen after a killed agent (restoring.py)."""
    import signal
    import subprocess
    import sys

    pidfile = tmp_path / "pid"
    agent = subprocess.Popen([sys.executable, "-c", (
        "import asyncio; from stasis.agent.process import run; "
        f"asyncio.run(run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 60'], timeout=90, die_with_agent=True))")])
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline and agent.poll() is None
            time.sleep(0.05)
        child = int(pidfile.read_text())
        os.kill(child, 0)   # running
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the command outlived the agent"
            time.sleep(0.05)
    finally:
        if agent.poll() is None:
            agent.kill()


def test_tail_keeps_last_lines():
    assert tail("a\n\nb\nc\n", 2) == "b | c"


def test_criu_failure_carries_the_tail_of_criu_log(tmp_path):
    from stasis.agent.podman import _criu_tail

    log = tmp_path / "dump.log"
    log.write_text("(00.001) Dumping task\n(00.002) Error (criu/files.c:123): Can't dump fd 7\n"
                   "(00.003) Error (criu/cr-dump.c:9): Dumping FAILED.\n(00.004) unrelated\n")
    stderr = f"Error: CRIU checkpointing failed -52. Please check CRIU logfile {log}: exit status 1\n"
    msg = _criu_tail(stderr)
    assert "CRIU checkpointing failed" in msg and "Can't dump fd 7" in msg and "Dumping FAILED" in msg
    assert "\n" not in msg


def test_sweep_removes_stale_requests_and_landed_pages(tmp_path, monkeypatch):
    from stasis.agent import podman as podman_mod

    requests, graph = tmp_path / "lazy", tmp_path / "containers" / "storage"
    requests.mkdir()
    graph.mkdir(parents=True)
    old, fresh = requests / ("a" * 64 + ".daemon"), requests / ("b" * 64 + ".dump")
    old.write_text("1\n")
    fresh.write_text("2\n")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    landed = tmp_path / "containers" / "stasis-pages" / "ckpt-xyz"
    landed.mkdir(parents=True)
    (landed / "pages-1.img").write_bytes(b"p")
    monkeypatch.setattr(podman_mod, "LAZY_REQUESTS", str(requests))
    runtime = podman_mod.PodmanRuntime()

    async def wrapped():
        return True

    async def fake_podman(*args, **kwargs):
        return type("Out", (), {"returncode": 0, "stdout": str(graph) + "\n", "stderr": ""})()
    monkeypatch.setattr(runtime, "_wrapped", wrapped)
    monkeypatch.setattr(runtime, "_podman", fake_podman)
    runtime.sweep()
    assert not old.exists() and fresh.exists()
    landing = asyncio.run(runtime.pages_landing())
    assert landing == str(tmp_path / "containers" / "stasis-pages") and os.listdir(landing) == []
    os.mkdir(os.path.join(landing, "mine"))
    assert asyncio.run(runtime.pages_landing()) == landing and os.listdir(landing) == ["mine"]


async def test_the_archive_may_end_once_podman_has_rewritten_network_status(tmp_path):
    """After runc's checkpoint, podman tars /dev/shm and then rewrites network.status: from then on the
    archive has all it needs from podman, which still exports and unmounts (a whole-filesystem sync)."""
    from stasis.agent.podman import _mtime, _podman_state_written
    status = tmp_path / "network.status"
    status.write_text('{"old": 1}')
    os.utime(status, ns=(1, 1))
    before = _mtime(str(status))
    dump = asyncio.get_running_loop().create_future()   # podman still running
    waiting = asyncio.ensure_future(_podman_state_written(dump, str(status), before, poll=0.001))
    await asyncio.sleep(0.02)
    assert not waiting.done()   # not rewritten yet
    status.write_text('{"eth0": ')   # podman's write under way: not whole JSON
    await asyncio.sleep(0.02)
    assert not waiting.done()
    status.write_text('{"eth0": {}}')
    assert await asyncio.wait_for(waiting, 2) is True
    dump.set_result(None)


async def test_podman_exiting_first_means_the_archive_waits_for_it(tmp_path):
    from stasis.agent.podman import _podman_state_written
    dump = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(_podman_state_written(dump, str(tmp_path / "network.status"), 0, poll=0.001))
    await asyncio.sleep(0.02)
    dump.set_result(None)   # podman exited (or failed) without writing it
    assert await asyncio.wait_for(waiting, 2) is False
