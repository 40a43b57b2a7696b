"""Revocation: a deny list checked on every call, on the controller and on every agent.

An entry names a principal (user:alice, agent:host-a, controller:controller) and denies every
certificate of it issued before the revocation, so a fresh certificate issued afterwards works
again; or it names one certificate by serial. The controller keeps the list and hands it to
agents with every heartbeat; agents keep the last copy on disk, so a restart forgets nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
from dataclasses import asdict, dataclass

from stasis.errors import FailedPrecondition, InvalidArgument
from stasis.security.pki import KINDS, Identity, check_name

PRINCIPAL = re.compile(r"^(controller|agent|user):(.+)$")


@dataclass(frozen=True)
class Revocation:
    principal: str = ""      # kind:name, or "" when a serial is given
    serial: int = 0          # one certificate, or 0
    before: str = ""         # RFC 3339: certificates of `principal` issued before this are denied
    reason: str = ""

    def matches(self, ident: Identity) -> bool:
        if self.serial:
            return ident.serial == self.serial
        return self.principal == ident.principal and ident.issued < dt.datetime.fromisoformat(self.before)

    def describe(self) -> str:
        what = (f"certificate serial {self.serial:x}" if self.serial
                else f"{self.principal} (issued before {self.before})")
        return what + (f": {self.reason}" if self.reason else "")


def parse_target(target: str, reason: str = "", now: dt.datetime | None = None) -> Revocation:
    """`user:alice`, `agent:host-a` or a certificate serial in hex."""
    m = PRINCIPAL.match(target)
    if m:
        check_name(m.group(1), m.group(2))
        # Certificates state times in whole seconds: round up, so every certificate issued until
        # now is covered (one issued later in this same second is too: issue again a second later).
        when = ((now or dt.datetime.now(dt.timezone.utc)) + dt.timedelta(seconds=1)).replace(microsecond=0)
        when = when.isoformat()
        return Revocation(principal=target, before=when, reason=reason[:200])
    try:
        serial = int(target.removeprefix("0x"), 16)
    except ValueError:
        raise InvalidArgument(f"revoke what? give KIND:NAME ({'|'.join(KINDS)}) or a certificate serial in hex, "
                              f"not {target!r}") from None
    if serial <= 0:
        raise InvalidArgument("a certificate serial is a positive hex number")
    return Revocation(serial=serial, reason=reason[:200])


class DenyList:
    def __init__(self, entries: list[Revocation] | None = None, path: str | None = None):
        self._lock = threading.Lock()
        self.path = path
        self.entries = list(entries or [])
        if path and os.path.exists(path):
            self.entries = self._read(path)

    def denied(self, ident: Identity) -> Revocation | None:
        for entry in self.entries:
            if entry.matches(ident):
                return entry
        return None

    def replace(self, entries: list[Revocation]) -> None:
        with self._lock:
            if entries == self.entries:
                return
            self.entries = list(entries)
            if self.path:
                tmp = f"{self.path}.tmp"
                with open(tmp, "w") as f:
                    json.dump([asdict(e) for e in entries], f)
                os.replace(tmp, self.path)

    def add(self, entry: Revocation) -> None:
        self.replace([*self.entries, entry])

    @staticmethod
    def _read(path: str) -> list[Revocation]:
        try:
            with open(path) as f:
                data = json.load(f)
            return [Revocation(principal=str(d.get("principal", "")), serial=int(d.get("serial", 0)),
                               before=str(d.get("before", "")), reason=str(d.get("reason", ""))) for d in data]
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            # Failing open would re-admit revoked certificates: refuse to start instead.
            raise FailedPrecondition(f"the saved deny list {path} is unreadable ({exc}); restore or delete it") \
                from None
