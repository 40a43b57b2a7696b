"""The controller's work: the host registry, the checkpoint catalog and the jobs that drive agents."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import structlog
from google.protobuf import json_format

from stasis.controller.agents import AgentClient
from stasis.controller.jobs import Job, JobManager
from stasis.controller.store import CheckpointRow, RevocationRow, Store
from stasis.errors import InvalidArgument, NotFound, PermissionDenied, StasisError, Unavailable
from stasis.proto import convert
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.security.authz import CALLER
from stasis.security.revocation import DenyList, parse_target
from stasis.security.tls import Transport
from stasis.storage.repository import Repository

log = structlog.get_logger("stasis.controller")


class ControllerService:
    def __init__(self, store: Store, repository: Repository, heartbeat_seconds: float = 2.0,
                 transport: Transport | None = None):
        self.store = store
        self.repository = repository
        self.heartbeat_seconds = heartbeat_seconds
        self.transport = transport or Transport.insecure()
        self.deny = DenyList([convert.revocation(pb.Revocation(principal=r.principal, serial=r.serial,
                                                                before=r.before, reason=r.reason))
                              for r in store.revocations()])
        self.jobs = JobManager(store)
        self._clients: dict[str, AgentClient] = {}
        from stasis.controller.schedules import Schedules
        self.schedules = Schedules(self)

    # ---------------------------------------------------------------- catalog

    async def sync_catalog(self) -> int:
        """Import manifests the catalog lacks: the repository, not this database, is the truth."""
        known = self.store.checkpoint_ids()
        added = 0
        for ident in await asyncio.to_thread(self.repository.checkpoint_ids):
            if ident in known:
                continue
            try:
                manifest = await asyncio.to_thread(self.repository.read_manifest, ident)
            except StasisError as exc:
                log.warning("skipping unreadable checkpoint", checkpoint=ident, error=exc.message)
                continue
            self.record(convert.checkpoint_pb(manifest))
            added += 1
        return added

    def record(self, c: pb.CheckpointSummary) -> None:
        self.store.record_checkpoint(CheckpointRow(
            id=c.id, created=c.created, host=c.host, container_name=c.container_name,
            container_id=c.container_id, image=c.image, image_id=c.image_id, runtime=c.runtime,
            criu_version=c.criu_version, size=c.size_bytes, image_size=c.image_bytes,
            leave_running=c.leave_running, timings=json.dumps(convert.timings_dict(c.timings)),
            tags=json.dumps(dict(c.tags)), schedule=c.tags.get("schedule", ""), new_bytes=c.new_bytes))

    def checkpoints(self, container: str = "", host: str = "", schedule: str = "") -> list[pb.CheckpointSummary]:
        return [_row_pb(r) for r in self.store.checkpoints(container, host, schedule)]

    async def checkpoint(self, ident: str) -> pb.CheckpointSummary:
        full = await asyncio.to_thread(self.repository.resolve, ident)
        rows = [r for r in self.store.checkpoints() if r.id == full]
        if rows:
            return _row_pb(rows[0])
        return convert.checkpoint_pb(await asyncio.to_thread(self.repository.read_manifest, full))

    # ---------------------------------------------------------------- hosts

    def register(self, name: str, address: str, info: pb.HostInfo) -> None:
        if not name or len(name) > 128:
            raise InvalidArgument("agent name must be 1-128 characters")
        self._check_agent_is(name)
        self.store.upsert_host(name, address, json_format.MessageToDict(info, preserving_proto_field_name=True))
        old = self._clients.pop(name, None)
        if old is not None and old.address != address:
            asyncio.ensure_future(old.close())
        log.info("agent registered", host=name, address=address)

    def heartbeat(self, name: str) -> bool:
        self._check_agent_is(name)
        return self.store.touch_host(name)

    @staticmethod
    def _check_agent_is(name: str) -> None:
        # An agent's certificate names its host: host-a's agent cannot register as host-b and have
        # host-b's migrations sent to it.
        caller = CALLER.get()
        if caller is not None and caller.kind == "agent" and caller.name != name:
            raise PermissionDenied(f"agent:{caller.name} may not speak for host {name!r}")

    # ---------------------------------------------------------------- security

    def revocations_pb(self) -> list[pb.Revocation]:
        return [convert.revocation_pb(e) for e in self.deny.entries]

    def revoke(self, target: str, reason: str) -> pb.Revocation:
        entry = parse_target(target, reason)
        caller = CALLER.get()
        if caller is not None and not entry.serial and entry.principal == caller.principal:
            raise InvalidArgument("you would revoke your own certificate; ask another admin")
        self.store.add_revocation(RevocationRow(principal=entry.principal, serial=f"{entry.serial:x}" if entry.serial
                                                else "", before=entry.before, reason=entry.reason))
        self.deny.add(entry)
        if entry.principal.startswith("agent:"):
            # Its calls are refused from now on; stop dialing it too.
            host = entry.principal.split(":", 1)[1]
            self.store.forget_host(host)
            client = self._clients.pop(host, None)
            if client is not None:
                asyncio.ensure_future(client.close())
        log.warning("certificate revoked", revocation=entry.describe(), by=caller.principal if caller else "")
        return self.revocations_pb()[-1]

    def whoami(self) -> pb.WhoAmIResponse:
        caller = CALLER.get()
        if caller is None or not self.transport.secure:
            return pb.WhoAmIResponse(principal="user:insecure", role="admin", tls=False)
        return pb.WhoAmIResponse(principal=caller.principal, role=caller.role, serial=f"{caller.serial:x}",
                                 not_after=caller.not_after.isoformat(), tls=True)

    def host_state(self, last_seen: float) -> str:
        return "up" if time.time() - last_seen <= 3 * self.heartbeat_seconds + 1 else "down"

    def hosts(self) -> list[pb.Host]:
        out = []
        for row in self.store.hosts():
            info = json_format.ParseDict(json.loads(row.info or "{}"), pb.HostInfo(), ignore_unknown_fields=True)
            out.append(pb.Host(name=row.name, address=row.address, state=self.host_state(row.last_seen),
                               last_seen=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.last_seen)),
                               info=info))
        return out

    def agent(self, host: str) -> AgentClient:
        row = self.store.host(host)
        if row is None:
            names = ", ".join(r.name for r in self.store.hosts()) or "none registered"
            raise NotFound(f"unknown host {host!r} (known: {names}); list them with 'stasis hosts'")
        if self.host_state(row.last_seen) != "up":
            ago = time.time() - row.last_seen
            raise Unavailable(f"host {host} is down: its agent at {row.address} last checked in "
                              f"{ago:.0f} s ago; start it or check its logs")
        client = self._clients.get(host)
        if client is None or client.address != row.address:
            client = self._clients[host] = AgentClient(host, row.address, self.transport)
        return client

    async def containers(self, host: str = "", all: bool = False) -> list[pb.Container]:
        names = [host] if host else [h.name for h in self.hosts() if h.state == "up"]
        results = await asyncio.gather(*(self.agent(n).containers(all) for n in names))
        out = []
        for name, items in zip(names, results, strict=True):
            for c in items:
                c.host = name
                out.append(c)
        return out

    # ---------------------------------------------------------------- jobs

    def _progress(self, job: Job):
        return lambda p: job.publish(p)

    def start_checkpoint(self, request_id: str, host: str, container: str, leave_running: bool) -> Job:
        params = {"host": host, "container": container, "leave_running": leave_running}
        found = self.jobs.existing(request_id, "checkpoint", params)
        if found is not None:   # a retry: attach, even if the host went down since
            return found
        agent = self.agent(host)

        async def work(job: Job) -> None:
            async with self.jobs.phase(job, "checkpoint"):
                summary = await agent.checkpoint(job.id, container, leave_running, self.repository.url,
                                                 self._progress(job))
            self.record(summary)
            job.result.update(checkpoint_id=summary.id, host=host, container=container,
                              size_bytes=str(summary.size_bytes))
            for t in summary.timings:
                job.timings[f"agent.{t.name}"] = round(t.seconds, 4)

        return self.jobs.start("checkpoint", params, request_id, work)

    async def start_restore(self, request_id: str, checkpoint_id: str, host: str, name: str) -> Job:
        params = {"checkpoint_id": checkpoint_id, "host": host, "name": name}
        found = self.jobs.existing(request_id, "restore", params)
        if found is not None:
            return found
        agent = self.agent(host)
        full = await asyncio.to_thread(self.repository.resolve, checkpoint_id)   # lists S3: off the loop

        async def work(job: Job) -> None:
            async with self.jobs.phase(job, "restore"):
                result = await agent.restore(job.id, full, self.repository.url, name, self._progress(job))
            job.result.update(checkpoint_id=full, host=host, container=result.container.name,
                              container_id=result.container.id, state=result.container.state)
            for t in result.timings:
                job.timings[f"agent.{t.name}"] = round(t.seconds, 4)

        return self.jobs.start("restore", params, request_id, work)

    def start_migrate(self, request_id: str, host: str, container: str, to: str, transfer: str = "",
                      ignore_volumes: bool = False, post_copy: bool = False) -> Job:
        from stasis.controller.migrate import Migration

        transfer = transfer or "direct"
        if post_copy and transfer != "direct":
            raise InvalidArgument("post-copy moves memory from agent to agent; it needs the direct transfer")
        params = {"host": host, "container": container, "to": to, "transfer": transfer,
                  "ignore_volumes": ignore_volumes, "post_copy": post_copy}
        found = self.jobs.existing(request_id, "migrate", params)
        if found is not None:
            return found
        if host == to:
            raise InvalidArgument(f"{container} is already on {host}: pick another destination")
        source, destination = self.agent(host), self.agent(to)
        migration = Migration(self, source, destination, container, transfer, ignore_volumes, post_copy)
        return self.jobs.start("migrate", params, request_id, migration.run)

    async def recover_jobs(self, retry_seconds: float = 2.0) -> None:
        """Finish or roll back the migrations a previous controller left half done.

        Their hosts must answer first; until they do, the job stays running and says what it waits
        for (rolling back needs the source, finishing needs the destination)."""
        from stasis.controller.migrate import Migration

        async def one(row) -> None:
            params = json.loads(row.params)
            while True:
                try:
                    source, destination = self.agent(params["host"]), self.agent(params["to"])
                    break
                except (Unavailable, NotFound) as exc:
                    log.warning("migration waits for its hosts to recover", job=row.id, error=exc.message)
                    await asyncio.sleep(retry_seconds)
            migration = Migration(self, source, destination, params["container"], params.get("transfer", "direct"),
                                  bool(params.get("ignore_volumes", False)), bool(params.get("post_copy", False)))
            await self.jobs.resume(row, migration.recover).done.wait()

        rows, self.jobs.interrupted = self.jobs.interrupted, []
        await asyncio.gather(*(one(r) for r in rows))

    async def close(self) -> None:
        await self.schedules.close()
        await self.jobs.close()
        for c in self._clients.values():
            await c.close()


def _row_pb(r: CheckpointRow) -> pb.CheckpointSummary:
    timings: dict[str, Any] = json.loads(r.timings or "{}")
    return pb.CheckpointSummary(
        id=r.id, created=r.created, host=r.host, container_name=r.container_name,
        container_id=r.container_id, image=r.image, image_id=r.image_id, runtime=r.runtime,
        criu_version=r.criu_version, size_bytes=r.size, image_bytes=r.image_size,
        leave_running=r.leave_running, timings=convert.timings_pb(timings), tags=json.loads(r.tags or "{}"),
        new_bytes=r.new_bytes or 0)
