"""The controller's audit log: who did what to which container and checkpoint, when, and how it ended.

Every call through the controller's API is recorded by the authorization interceptor, refused ones
included; agents' heartbeats are not (one per agent every few seconds says nothing). Only the
request's target fields are kept (host, container, checkpoint, schedule, ...): never hooks' command
lines, labels or anything else a request carries, so no secret reaches the log.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import grpc

from stasis.controller.store import AuditRow, Store
from stasis.errors import InvalidArgument
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.security.pki import Identity

TARGET_FIELDS = ("host", "container", "to", "checkpoint_id", "name", "id", "schedule", "target", "selector",
                 "prune", "dry_run", "leave_running", "principal")
QUIET = {"Heartbeat"}


class AuditLog:
    def __init__(self, store: Store):
        self.store = store

    def __call__(self, ident: Identity, method: str, request, response, code: grpc.StatusCode, message: str,
                 seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        if name in QUIET and code == grpc.StatusCode.OK:
            return
        self.store.add_audit(AuditRow(
            time=time.time(), principal=ident.principal, role=ident.role, method=name,
            target=json.dumps(_target(request)), code=code.name, message=message[:500],
            seconds=seconds, job_id=_job_id(response)))

    def entries(self, since: str = "", principal: str = "", limit: int = 100) -> list[pb.AuditEntry]:
        start = 0.0
        if since:
            try:
                start = dt.datetime.fromisoformat(since).timestamp()
            except ValueError:
                raise InvalidArgument(f"since: {since!r} is not an RFC 3339 time") from None
        rows = self.store.audit(start, principal, min(limit or 100, 10_000))
        return [pb.AuditEntry(time=dt.datetime.fromtimestamp(r.time, dt.timezone.utc).isoformat(timespec="milliseconds")
                              .replace("+00:00", "Z"),
                              principal=r.principal, role=r.role, method=r.method, target=json.loads(r.target),
                              code=r.code, message=r.message, seconds=r.seconds, job_id=r.job_id)
                for r in rows]


def _target(request) -> dict[str, str]:
    out: dict[str, str] = {}
    for field, value in request.ListFields():
        if field.name in TARGET_FIELDS and not field.is_repeated and field.message_type is None:
            out[field.name] = str(value).lower() if isinstance(value, bool) else str(value)[:200]
    return out


def _job_id(response: Any) -> str:
    if response is None:
        return ""
    job = getattr(response, "job", None)
    if job is not None and hasattr(response, "HasField") and response.HasField("job"):
        return job.id
    return ""
