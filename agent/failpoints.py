"""Named places where a test can make the agent fail on purpose (like etcd's gofail).

STASIS_FAILPOINTS="restore.before_runtime,..." in the agent's environment arms them. Off by default;
they exist so rollback paths are tested against real failures at exact moments. A pause failpoint
holds its place instead, so a test can crash something while the agent is inside a phase that would
otherwise pass too fast to hit.
"""

from __future__ import annotations

import asyncio
import os

from stasis.errors import RuntimeFailure

PAUSE = 4.0   # seconds a pause failpoint holds (STASIS_FAILPOINT_PAUSE sets it): a test acts inside


def armed() -> set[str]:
    return {p.strip() for p in os.environ.get("STASIS_FAILPOINTS", "").split(",") if p.strip()}


def hit(name: str) -> None:
    if name in armed():
        raise RuntimeFailure(f"failpoint {name} is armed (STASIS_FAILPOINTS)")


async def pause(name: str) -> None:
    if name in armed():
        await asyncio.sleep(float(os.environ.get("STASIS_FAILPOINT_PAUSE") or PAUSE))
