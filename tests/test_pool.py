"""Page pools (agent/pool.py): memory for a direct migration's pages, made ready in preflight."""

from __future__ import annotations

import os

from stasis.agent import pool


async def test_a_pool_is_a_file_of_the_size_asked_taken_once(tmp_path):
    pools = pool.Pools()
    path = await pools.prepare(str(tmp_path), 80 << 20)
    assert os.path.getsize(path) == 80 << 20 and os.path.dirname(path) != str(tmp_path)
    with open(path, "rb") as f:   # reserved, never written: zeros
        assert f.read(4096) == bytes(4096)
    assert pools.take() == path and pools.take() == ""
    pool.drop(path)
    assert os.listdir(tmp_path) == []


async def test_no_pool_for_small_containers_no_landing_or_too_little_memory(tmp_path, monkeypatch):
    pools = pool.Pools()
    assert await pools.prepare(str(tmp_path), 1 << 20) == ""   # below pool.MIN_SIZE
    assert await pools.prepare("", 100 << 20) == ""
    monkeypatch.setattr(pool, "available_memory", lambda: 100 << 20)
    assert await pools.prepare(str(tmp_path), 80 << 20) == ""
    assert os.listdir(tmp_path) == [] and pools.take() == ""


async def test_a_pool_that_cannot_be_made_or_is_never_taken_leaves_nothing(tmp_path, monkeypatch):
    pools = pool.Pools()

    def full(path, size):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pool, "warm", full)
    assert await pools.prepare(str(tmp_path), 80 << 20) == ""
    monkeypatch.undo()
    path = await pools.prepare(str(tmp_path), 80 << 20)
    assert path
    pools.expire(ttl=0)   # a migration that never came
    assert pools.take() == "" and os.listdir(tmp_path) == []


def test_warming_stops_at_its_budget_and_the_file_keeps_its_size(tmp_path):
    path = str(tmp_path / "pages")
    pool.warm(path, 64 << 20, budget=0)
    assert os.path.getsize(path) == 64 << 20
