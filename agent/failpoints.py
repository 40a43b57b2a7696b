"""Named places where a test can make the agent fail on purpose (like etcd's gofail).

STASIS_FAILPOINTS="restore.before_runtime,..." in the agent's environment arms them. Off by default;
they exist so rollback paths are tested against real failures at exact moments.
"""

from __future__ import annotations

import os

from stasis.errors import RuntimeFailure


def armed() -> set[str]:
    return {p.strip() for p in os.environ.get("STASIS_FAILPOINTS", "").split(",") if p.strip()}


def hit(name: str) -> None:
    if name in armed():
        raise RuntimeFailure(f"failpoint {name} is armed (STASIS_FAILPOINTS)")
