"""Retention on synthetic timelines with a fake clock."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stasis.controller.retention import Policy, decide, parse_duration
from stasis.errors import InvalidArgument

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)


def timeline(step: timedelta, count: int) -> list[tuple[str, float]]:
    return [(f"b{i:04d}", (T0 - i * step).timestamp()) for i in range(count)]   # b0000 is the newest


def test_keep_last():
    keep = decide(timeline(timedelta(minutes=15), 10), Policy(last=3), T0.timestamp())
    assert sorted(keep) == ["b0000", "b0001", "b0002"]


def test_gfs_on_a_month_of_quarter_hourly_backups():
    points = timeline(timedelta(minutes=15), 4 * 24 * 31)
    keep = decide(points, Policy(last=4, hourly=24, daily=7, weekly=4, monthly=6), T0.timestamp())
    by_reason = {r: [i for i, rs in keep.items() if r in rs] for r in ("last", "hourly", "daily", "weekly", "monthly")}
    assert len(by_reason["last"]) == 4 and len(by_reason["hourly"]) == 24
    assert len(by_reason["daily"]) == 7 and len(by_reason["weekly"]) == 4
    assert len(by_reason["monthly"]) == 2          # the timeline spans two calendar months
    times = dict(points)
    daily = sorted((datetime.fromtimestamp(times[i], timezone.utc) for i in by_reason["daily"]), reverse=True)
    assert [d.date() for d in daily] == [(T0 - timedelta(days=n)).date() for n in range(7)]
    assert all(d.hour == 23 and d.minute == 45 for d in daily[1:])   # the newest of each day
    assert len(keep) < 45                                             # everything else goes


def test_keep_within():
    keep = decide(timeline(timedelta(hours=1), 100), Policy(within=2 * 86400), T0.timestamp())
    assert len(keep) == 49      # 0..48 hours old


def test_the_newest_backup_is_always_kept():
    points = timeline(timedelta(days=40), 3)
    keep = decide(points, Policy(within=3600), (T0 + timedelta(days=10)).timestamp())   # all outside the window
    assert list(keep) == ["b0000"] and keep["b0000"] == ["newest"]


def test_an_empty_policy_keeps_everything():
    assert len(decide(timeline(timedelta(hours=1), 5), Policy(), T0.timestamp())) == 5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10 ** 8), min_size=1, max_size=60, unique=True),
       st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5), st.integers(0, 5))
def test_properties(offsets, last, hourly, daily, weekly, monthly):
    points = [(f"p{o}", T0.timestamp() - o) for o in offsets]
    policy = Policy(last, hourly, daily, weekly, monthly)
    keep = decide(points, policy, T0.timestamp())
    newest = min(offsets)
    assert f"p{newest}" in keep                                          # never lose the last good one
    assert set(keep) <= {p for p, _ in points}
    if not policy.empty:
        assert len(keep) <= 1 + last + hourly + daily + weekly + monthly
    assert decide(points, policy, T0.timestamp()) == keep                # deterministic


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800), ("30", 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "x", "-5m", "0", "3y"])
def test_bad_durations(text):
    with pytest.raises(InvalidArgument):
        parse_duration(text)
