"""The freeze moment from outside: a real ptrace seize turns a process traced, as CRIU's does."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from stasis.agent import freeze

# Seizes the pid in argv[1] after argv[2] seconds and holds it (PTRACE_SEIZE, as CRIU does).
SEIZER = """
import ctypes, sys, time
time.sleep(float(sys.argv[2]))
libc = ctypes.CDLL(None, use_errno=True)
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:
    sys.exit(ctypes.get_errno())
print("seized", flush=True)
time.sleep(30)
"""


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def test_tracer_reads_proc():
    child = _sleeper()
    try:
        assert freeze.tracer(child.pid) == 0
    finally:
        child.kill()
        child.wait()
    assert freeze.tracer(child.pid) is None   # reaped: gone


def test_until_seized_returns_when_the_process_is_seized():
    child = _sleeper()
    seizer = subprocess.Popen([sys.executable, "-c", SEIZER, str(child.pid), "0.3"], stdout=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        asyncio.run(freeze.until_seized(child.pid, lambda: False, timeout=10))
        waited = time.monotonic() - started
        assert seizer.stdout.readline().strip() == "seized"
        assert freeze.tracer(child.pid) == seizer.pid
        assert 0.25 < waited < 5, waited
    finally:
        seizer.kill()
        seizer.wait()
        child.kill()
        child.wait()


def test_until_seized_stops_when_the_dump_gives_up_or_the_process_is_gone():
    child = _sleeper()
    try:
        calls = []

        def gave_up() -> bool:
            calls.append(1)
            return len(calls) > 20
        started = time.monotonic()
        asyncio.run(freeze.until_seized(child.pid, gave_up, timeout=10))
        assert time.monotonic() - started < 5 and len(calls) == 21
    finally:
        child.kill()
        child.wait()
    started = time.monotonic()
    asyncio.run(freeze.until_seized(child.pid, lambda: False, timeout=10))   # gone: at once
    asyncio.run(freeze.until_seized(0, lambda: False, timeout=10))           # no pid known: at once
    assert time.monotonic() - started < 1


def test_a_process_traced_already_gives_no_signal():
    child = _sleeper()
    seizer = subprocess.Popen([sys.executable, "-c", SEIZER, str(child.pid), "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert seizer.stdout.readline().strip() == "seized"
        started = time.monotonic()
        asyncio.run(freeze.until_seized(child.pid, lambda: False, timeout=10))
        assert time.monotonic() - started < 1
    finally:
        seizer.kill()
        seizer.wait()
        child.kill()
        child.wait()


def test_container_pid_reads_either_engines_inspect_document():
    assert freeze.container_pid({"State": {"Pid": 4112}}) == 4112
    assert freeze.container_pid({"State": {"Pid": 0}}) == 0       # not running
    assert freeze.container_pid({"State": None}) == 0
    assert freeze.container_pid({"State": {"Pid": "x"}}) == 0
