"""Translations between the plain classes and the v1 messages, kept in one place."""

from __future__ import annotations

from datetime import datetime

from stasis.agent.runtime import ContainerInfo
from stasis.errors import InvalidArgument
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.security.revocation import Revocation
from stasis.storage.manifest import Manifest


def timings_pb(timings: dict[str, float]) -> list[pb.PhaseTiming]:
    return [pb.PhaseTiming(name=k, seconds=float(v)) for k, v in timings.items()]


def timings_dict(timings) -> dict[str, float]:
    return {t.name: t.seconds for t in timings}


def container_pb(c: ContainerInfo, host: str = "") -> pb.Container:
    return pb.Container(id=c.id, name=c.name, image=c.image, image_id=c.image_id, state=c.state,
                        host=host, created=c.created, labels=c.labels)


def host_info_pb(info: dict) -> pb.HostInfo:
    return pb.HostInfo(**info)


def checkpoint_pb(m: Manifest) -> pb.CheckpointSummary:
    return pb.CheckpointSummary(
        id=m.id, created=m.created, host=m.host, container_name=m.container.name,
        container_id=m.container.id, image=m.container.image, image_id=m.container.image_id,
        runtime=m.runtime, criu_version=m.criu_version, size_bytes=m.checkpoint.size,
        image_bytes=m.image.size if m.image else 0, leave_running=m.leave_running,
        timings=timings_pb(m.timings), tags=m.tags, new_bytes=m.new_bytes)


def revocation_pb(r: Revocation) -> pb.Revocation:
    return pb.Revocation(principal=r.principal, serial=f"{r.serial:x}" if r.serial else "", before=r.before,
                         reason=r.reason)


def revocation(r: pb.Revocation) -> Revocation:
    try:
        serial = int(r.serial, 16) if r.serial else 0
        if r.principal and not r.serial:
            datetime.fromisoformat(r.before)   # Revocation.matches parses it on every call
    except ValueError:
        raise InvalidArgument(f"malformed revocation {r.principal or r.serial!r}") from None
    return Revocation(principal=r.principal, serial=serial, before=r.before, reason=r.reason)
