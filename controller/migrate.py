"""Migration: a job with explicit phases, rolled back on any failure before commit.

    preflight -> checkpoint (source stops) -> restore (destination) -> verify -> commit -> cleanup

Invariant: at every moment at least one restorable copy exists and at most one copy runs. Before
commit, a failure removes whatever the destination started and resumes the source from its own
local checkpoint; after commit only clean-up of the source is left, and its failure is reported
without undoing the migration.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from stasis.controller.agents import AgentClient
from stasis.errors import AlreadyExists, FailedPrecondition, NotFound, StasisError
from stasis.security import tickets

if TYPE_CHECKING:
    from stasis.controller.jobs import Job
    from stasis.controller.service import ControllerService

log = structlog.get_logger("stasis.controller")


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class Migration:
    def __init__(self, service: "ControllerService", source: AgentClient, destination: AgentClient,
                 container: str, transfer: str = "direct"):
        self.service = service
        self.jobs = service.jobs
        self.source = source
        self.destination = destination
        self.container = container
        # direct: the destination fetches the archive from the source (one hop, no backup left);
        # repository: through the repository, which keeps the checkpoint as a backup.
        self.transfer = transfer

    async def run(self, job: "Job") -> None:
        async with self.jobs.phase(job, "preflight"):
            await self.preflight()
        frozen_at = time.monotonic()
        self.restore_started = False
        try:
            direct = self.transfer == "direct"
            job.result["transfer"] = self.transfer
            async with self.jobs.phase(job, "checkpoint"):
                summary = await self.source.checkpoint(job.id, self.container, False,
                                                       self.service.repository.url,
                                                       lambda p: job.publish(p), direct=direct)
            if not direct:
                self.service.record(summary)
            job.result["checkpoint_id"] = summary.id
            for t in summary.timings:
                job.timings[f"source.{t.name}"] = round(t.seconds, 4)
            async with self.jobs.phase(job, "restore"):
                self.restore_started = True
                peer, ticket = None, b""
                if direct:
                    peer = self.source
                    ticket = tickets.mint(self.service.transport, job.id, summary.id, self.source.name,
                                          self.destination.name)
                restored = await self.destination.restore(job.id, summary.id, self.service.repository.url,
                                                          self.container, lambda p: job.publish(p), peer, ticket)
            job.row.downtime = round(time.monotonic() - frozen_at, 4)
            for t in restored.timings:
                job.timings[f"destination.{t.name}"] = round(t.seconds, 4)
            async with self.jobs.phase(job, "verify"):
                running = await self.destination.inspect(self.container)
                if running.state != "running":
                    raise StasisError(f"{self.container} on {self.destination.name} is {running.state} "
                                      f"after restore, not running")
        except AlreadyExists as exc:
            # The destination refused because the name is taken by a container this job did not
            # create: it must not be touched.
            self.restore_started = False
            await self.rollback(job, exc)
            return
        except StasisError as exc:
            await self.rollback(job, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the source stopped
            log.error("migration failed unexpectedly; rolling back", job=job.id, exc_info=exc)
            await self.rollback(job, StasisError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        async with self.jobs.phase(job, "commit"):
            job.result.update(host=self.destination.name, container=self.container,
                              container_id=running.id)
            job.row.state = "succeeded"   # durable: from here on the destination is the container
            self.jobs.save(job)
        async with self.jobs.phase(job, "cleanup"):
            try:
                await self.source.remove(self.container, force=True)
                job.result["cleanup"] = "done"
            except StasisError as exc:
                job.result["cleanup"] = f"failed: {exc.message}"
                log.warning("source clean-up failed after commit", job=job.id, error=exc.message)

    async def preflight(self) -> None:
        """Refuse before anything is frozen: every reason here leaves the source untouched."""
        src_info, dst_info = await self.source.host_info(), await self.destination.host_info()
        c = await self.source.inspect(self.container)
        if c.state != "running":
            raise FailedPrecondition(f"{self.container} on {self.source.name} is {c.state}, not running")
        if src_info.runtime != dst_info.runtime:
            raise FailedPrecondition(f"{self.source.name} runs {src_info.runtime}, "
                                     f"{self.destination.name} runs {dst_info.runtime}")
        if not dst_info.criu_version:
            raise FailedPrecondition(f"{self.destination.name} has no working CRIU")
        if _version(dst_info.criu_version) < _version(src_info.criu_version):
            raise FailedPrecondition(f"CRIU on {self.destination.name} ({dst_info.criu_version}) is older "
                                     f"than on {self.source.name} ({src_info.criu_version})")
        try:
            await self.destination.inspect(self.container)
            raise AlreadyExists(f"a container named {self.container!r} already exists on "
                                f"{self.destination.name}; remove it first")
        except NotFound:
            pass

    async def rollback(self, job: "Job", cause: StasisError) -> None:
        async with self.jobs.phase(job, "rollback"):
            problems = []
            if self.restore_started:  # never touch a destination container this job did not start
                try:
                    await self.destination.remove(self.container, force=True)
                except NotFound:
                    pass
                except StasisError as exc:
                    problems.append(f"destination clean-up: {exc.message}")
            try:
                await self.source.resume(self.container)
            except StasisError as exc:
                problems.append(f"source resume: {exc.message}")
        job.row.error = cause.message + (f"; rollback problems: {'; '.join(problems)}" if problems else
                                         f"; rolled back: {self.container} runs on {self.source.name}")
        job.row.state = "failed" if problems else "rolled_back"
