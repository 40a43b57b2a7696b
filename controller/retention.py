"""Retention policies for backups, with restic's semantics (keep-last, hourly, daily, weekly,
monthly, within) and one rule of our own: the newest backup is always kept.

Pure functions over (id, time) pairs, so the rules are tested on synthetic timelines with a fake
clock. Failed backups never reach here: a backup exists only once its manifest is committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    within: float = 0.0   # seconds

    @property
    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.within))


_BUCKETS = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: t.isocalendar()[:2]),
    ("monthly", lambda t: (t.year, t.month)),
)


def decide(points: list[tuple[str, float]], policy: Policy, now: float) -> dict[str, list[str]]:
    """Which backups to keep, with the reasons; every id not in the result is to be forgotten.

    An empty policy keeps everything (forgetting all but one by accident is not a default)."""
    ordered = sorted(points, key=lambda p: (p[1], p[0]), reverse=True)   # newest first
    if policy.empty:
        return {ident: ["no policy"] for ident, _ in ordered}
    keep: dict[str, list[str]] = {}
    if ordered:
        keep.setdefault(ordered[0][0], []).append("newest")   # the last good backup, always
    for ident, _ in ordered[:policy.last]:
        keep.setdefault(ident, []).append("last")
    for name, key in _BUCKETS:
        budget = getattr(policy, name)
        seen = set()
        for ident, ts in ordered:
            if len(seen) >= budget:
                break
            bucket = key(datetime.fromtimestamp(ts, timezone.utc))
            if bucket not in seen:
                seen.add(bucket)
                keep.setdefault(ident, []).append(name)
    if policy.within:
        for ident, ts in ordered:
            if now - ts <= policy.within:
                keep.setdefault(ident, []).append("within")
    return keep


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '7d', '2w' (or a plain number of seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = (text or "").strip().lower()
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        from stasis.errors import InvalidArgument
        raise InvalidArgument(f"duration {text!r} is invalid: use e.g. 90s, 15m, 2h, 7d")
    return value
