"""When CRIU stops a container: the moment a migration's downtime starts.

The engine's dump call returns long after the freeze, and runc starts tens of milliseconds before it
(runc and CRIU prepare while the container still runs: ~45 ms here). CRIU freezes the container's
cgroup and at once seizes every task with ptrace, so the container's first process turns traced
(/proc/PID/status: TracerPid) within a fraction of a millisecond of the freeze. That is observable
from outside, whichever engine drives CRIU. The freezer's own state is not: CRIU thaws the cgroup
again once the tasks are seized, within a millisecond.
"""

from __future__ import annotations

import asyncio
from typing import Callable

POLL = 0.001   # the error of the moment found; a read of /proc/PID/status costs ~20 µs


def container_pid(inspected: dict) -> int:
    """The host pid of a container's first process from the engine's inspect document (podman's and
    docker's alike: State.Pid), 0 if it has none."""
    try:
        return int((inspected.get("State") or {}).get("Pid") or 0)
    except (TypeError, ValueError):
        return 0


def tracer(pid: int) -> int | None:
    """The pid tracing `pid` (0: none), or None if `pid` is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"TracerPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


async def until_seized(pid: int, gave_up: Callable[[], bool], timeout: float = 30.0) -> None:
    """Return once `pid` becomes traced (CRIU seized it: the container is frozen), or is gone, or
    `gave_up()` (the dump ended without it), or after `timeout`. A process traced already when this
    starts (a debugger attached) gives no signal: return at once, the caller's moment stands."""
    if not pid or tracer(pid) != 0:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not gave_up() and loop.time() < deadline:
        if tracer(pid) != 0:
            return
        await asyncio.sleep(POLL)
