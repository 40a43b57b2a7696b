"""Failpoints: off unless armed by name; a pause holds, a hit fails."""

import asyncio
import time

import pytest

from stasis.agent import failpoints
from stasis.errors import RuntimeFailure


def test_nothing_is_armed_by_default(monkeypatch):
    monkeypatch.delenv("STASIS_FAILPOINTS", raising=False)
    failpoints.hit("restore.before_runtime")   # does not raise
    started = time.monotonic()
    asyncio.run(failpoints.pause("restore.pause_before_runtime"))
    assert time.monotonic() - started < 1.0


def test_an_armed_hit_fails_and_an_armed_pause_holds(monkeypatch):
    monkeypatch.setenv("STASIS_FAILPOINTS", " transfer.corrupt_byte, restore.pause_before_runtime ,"
                                            "restore.before_runtime")
    monkeypatch.setattr(failpoints, "PAUSE", 0.2)
    assert failpoints.armed() == {"transfer.corrupt_byte", "restore.pause_before_runtime", "restore.before_runtime"}
    with pytest.raises(RuntimeFailure, match="restore.before_runtime"):
        failpoints.hit("restore.before_runtime")
    started = time.monotonic()
    asyncio.run(failpoints.pause("restore.pause_before_runtime"))
    assert time.monotonic() - started >= 0.2
    monkeypatch.setenv("STASIS_FAILPOINT_PAUSE", "0.5")
    started = time.monotonic()
    asyncio.run(failpoints.pause("restore.pause_before_runtime"))
    assert time.monotonic() - started >= 0.5
