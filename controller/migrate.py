"""Migration: a job with explicit phases, rolled back on any failure before commit.

    preflight -> checkpoint (source stops) -> restore (destination) -> verify -> commit -> cleanup

Every agent call carries the job id as its operation id, so calling again after a controller
restart joins (or replays) what the agent did instead of doing it twice: `recover` picks a job up
at its persisted phase.

Invariant: at every moment at least one restorable copy exists and at most one copy runs. Before
commit, a failure removes whatever the destination started and resumes the source from its own
local checkpoint; after commit only clean-up of the source is left, and its failure is reported
without undoing the migration.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from stasis.controller.agents import AgentClient
from stasis.storage.repository import new_checkpoint_id
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.errors import (AlreadyExists, DeadlineExceeded, FailedPrecondition, NotFound, StasisError,
                           Unavailable)
from stasis.security import tickets

if TYPE_CHECKING:
    from stasis.controller.jobs import Job
    from stasis.controller.service import ControllerService

log = structlog.get_logger("stasis.controller")
POST_COPY_END = 30.0   # seconds a post-copy rollback waits to learn how the source's dump ended


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class Migration:
    def __init__(self, service: "ControllerService", source: AgentClient, destination: AgentClient,
                 container: str, transfer: str = "direct", ignore_volumes: bool = False, post_copy: bool = False):
        self.service = service
        self.jobs = service.jobs
        self.source = source
        self.destination = destination
        self.container = container
        # direct: the destination fetches the archive from the source (one hop, no backup left);
        # repository: through the repository, which keeps the checkpoint as a backup.
        self.transfer = transfer
        # Named volumes stay behind: both hosts mount the same shared storage under the same names.
        self.ignore_volumes = ignore_volumes
        # Restore first, memory follows on demand (lazy pages); downtime stops growing with memory.
        self.post_copy = post_copy
        self.running_at: float | None = None   # when the destination reported the container runs
        self.freezing_at: float | None = None  # when the source reported its dump beginning
        self.post_copy_dump: asyncio.Future | None = None   # the source's Checkpoint call, post-copy
        self.destination_restoring = False   # the destination said its runtime began restoring

    async def run(self, job: "Job") -> None:
        async with self.jobs.phase(job, "preflight"):
            await self.preflight()
        job.result["pre_copy"] = self.pre_copy
        job.result["mode"] = "post-copy" if self.post_copy else "stop-and-copy"
        await self._move(job)

    async def recover(self, job: "Job") -> None:
        """Pick up a job a controller restart interrupted, at the phase it had reached."""
        phase = job.row.phase
        job.result["recovered"] = f"after a controller restart in phase {phase or 'start'}"
        log.warning("recovering migration", job=job.id, phase=phase)
        if phase in ("", "preflight"):
            # The checkpoint phase is saved before the source is asked to dump: nothing was frozen.
            job.row.state, job.row.error = "failed", ("the controller restarted during preflight; nothing was "
                                                      f"changed and {self.container} runs on {self.source.name}")
            return
        self.restore_started = job.result.get("restore_started") == "true"
        if job.row.state == "succeeded":   # committed: only the clean-up is left
            await self._finish(job, pb.Container())
            return
        if phase == "rollback":
            await self.rollback(job, StasisError(job.row.error or "the controller restarted during rollback"))
            return
        if phase == "commit":   # verified, not yet durable: commit if it still runs, else roll back
            try:
                running = await self.destination.inspect(self.container)
            except NotFound:
                running = pb.Container(state="gone")
            if running.state == "running":
                await self._finish(job, running)
            else:
                await self.rollback(job, StasisError(f"{self.container} on {self.destination.name} is "
                                                     f"{running.state} after the controller restarted"))
            return
        # checkpoint, restore or verify: the same calls again, with the same operation ids.
        await self._move(job, recovering=True)

    async def _move(self, job: "Job", recovering: bool = False) -> None:
        frozen_at = time.monotonic()
        # A recovered job whose restore had begun: the destination may hold our container already.
        resumed_restore = self.restore_started = recovering and job.result.get("restore_started") == "true"
        try:
            job.result["transfer"] = self.transfer
            if self.post_copy:
                restored = await self._post_copy(job, resumed_restore)
            elif self.transfer == "direct":
                restored = await self._direct(job, resumed_restore)
            else:
                restored = await self._via_repository(job, recovering, resumed_restore)
            if not recovering:   # post-copy: the container ran before its memory had all arrived
                job.row.downtime = round((self.running_at or time.monotonic()) - (self.freezing_at or frozen_at), 4)
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
            job.result["restore_started"] = "false"
            await self.rollback(job, exc)
            return
        except StasisError as exc:
            await self.rollback(job, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the source stopped
            log.error("migration failed unexpectedly; rolling back", job=job.id, exc_info=exc)
            await self.rollback(job, StasisError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        await self._finish(job, running)

    async def _finish(self, job: "Job", running: pb.Container) -> None:
        """Commit (the destination runs, verified), then clean the source up; only the latter retries."""
        if job.row.state != "succeeded":
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

    async def _direct(self, job: "Job", resumed_restore: bool) -> pb.RestoreResult:
        """Dump on the source while the destination fetches the archive as it is written."""
        # The id is chosen here, so the ticket can name it before the dump begins.
        ckpt_id = job.result.get("checkpoint_id") or new_checkpoint_id()
        job.result["checkpoint_id"] = ckpt_id
        ticket = tickets.mint(self.service.transport, job.id, ckpt_id, self.source.name, self.destination.name)
        self.restore_started = True
        job.result["restore_started"] = "true"   # saved with the phase: a recovery must know
        fetch = asyncio.ensure_future(self._restore(job, ckpt_id, self.source, ticket, resumed_restore))
        try:
            async with self.jobs.phase(job, "checkpoint"):
                summary = await self.source.checkpoint(job.id, self.container, False, self.service.repository.url,
                                                       self._source_progress(job), direct=True, checkpoint_id=ckpt_id,
                                                       ignore_volumes=self.ignore_volumes)
        except BaseException:
            # The destination cannot restore a dump that failed (no seal); let its call end first.
            await asyncio.gather(fetch, return_exceptions=True)
            raise
        for t in summary.timings:
            job.timings[f"source.{t.name}"] = round(t.seconds, 4)
        async with self.jobs.phase(job, "restore"):
            return await fetch

    def _source_progress(self, job: "Job"):
        """Publish the source's progress; its dump beginning is where downtime starts (what the
        agent does before, such as inspecting the container, does not stop it)."""
        def progress(p: pb.Progress) -> None:
            if p.phase == "dump" and self.freezing_at is None:
                self.freezing_at = time.monotonic()
            job.publish(p)
        return progress

    async def _post_copy(self, job: "Job", resumed_restore: bool) -> pb.RestoreResult:
        """Everything but memory moves as in a direct migration; the destination restores at once and
        takes the pages from the source (relayed by the agents) as they are touched, while the rest
        stream behind. Its Restore call ends when every page is there; a failure before that aborts
        the source's dump, which resumes the container on the source."""
        ckpt_id = job.result.get("checkpoint_id") or new_checkpoint_id()
        job.result["checkpoint_id"] = ckpt_id
        fetch_ticket, page_ticket = (tickets.mint(self.service.transport, job.id, ckpt_id, self.source.name,
                                                  self.destination.name) for _ in range(2))
        running = asyncio.Event()

        def progress(p: pb.Progress) -> None:
            if p.phase in ("restore", "running"):
                self.destination_restoring = True
            if p.phase == "running":   # the destination's restore is done: downtime ends
                self.running_at = time.monotonic()
                running.set()
            job.publish(p)

        self.restore_started = True
        job.result["restore_started"] = "true"
        restore = asyncio.ensure_future(self.destination.restore(
            job.id, ckpt_id, self.service.repository.url, self.container, progress, self.source, fetch_ticket,
            self.ignore_volumes, post_copy=True, page_ticket=page_ticket))
        dump = asyncio.ensure_future(self.source.checkpoint(
            job.id, self.container, False, self.service.repository.url, self._source_progress(job), direct=True,
            checkpoint_id=ckpt_id, ignore_volumes=self.ignore_volumes, post_copy=True))
        def memory_left(t: asyncio.Future) -> None:
            # A failed side is reported by the rollback; the source's dump ends when the rollback
            # resumes it. A lazy dump that succeeded ended once every page had been taken: from
            # there the destination's container is the only copy, and a rollback must not remove it.
            if not t.cancelled() and t.exception() is None:
                job.result["memory_left"] = "true"
        dump.add_done_callback(memory_left)
        self.post_copy_dump = dump
        try:
            async with self.jobs.phase(job, "checkpoint"):   # until the destination runs
                waiter = asyncio.ensure_future(running.wait())
                await asyncio.wait([waiter, restore, dump], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                for side in (restore, dump):
                    if side.done() and side.exception() is not None:
                        raise side.exception()
            async with self.jobs.phase(job, "pages"):   # until every page has arrived
                restored = await restore
        except BaseException:
            restore.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise
        try:   # every page is on the destination: the source's own ending no longer matters
            summary = await dump
            for t in summary.timings:
                job.timings[f"source.{t.name}"] = round(t.seconds, 4)
        except StasisError as exc:
            job.result["source_dump"] = f"ended with an error after the memory had left: {exc.message}"
        return restored

    async def _via_repository(self, job: "Job", recovering: bool, resumed_restore: bool) -> pb.RestoreResult:
        if recovering and job.row.phase != "checkpoint" and job.result.get("checkpoint_id"):
            ckpt_id = job.result["checkpoint_id"]   # the checkpoint is committed
        else:
            async with self.jobs.phase(job, "checkpoint"):
                summary = await self.source.checkpoint(job.id, self.container, False, self.service.repository.url,
                                                       self._source_progress(job), ignore_volumes=self.ignore_volumes)
            self.service.record(summary)
            ckpt_id = job.result["checkpoint_id"] = summary.id
            for t in summary.timings:
                job.timings[f"source.{t.name}"] = round(t.seconds, 4)
        self.restore_started = True
        job.result["restore_started"] = "true"
        async with self.jobs.phase(job, "restore"):
            return await self._restore(job, ckpt_id, None, b"", resumed_restore)

    async def _restore(self, job: "Job", ckpt_id: str, peer: AgentClient | None, ticket: bytes,
                       resumed_restore: bool) -> pb.RestoreResult:
        def progress(p: pb.Progress) -> None:
            if p.phase in ("restore", "running"):   # the destination's runtime has begun making the container
                self.destination_restoring = True
            if p.phase == "running" and self.running_at is None:   # restored; its checks follow
                self.running_at = time.monotonic()
            job.publish(p)
        try:
            return await self.destination.restore(job.id, ckpt_id, self.service.repository.url, self.container,
                                                  progress, peer, ticket, self.ignore_volumes)
        except AlreadyExists:
            if not resumed_restore:
                raise
            # The destination forgot our first call (its agent restarted) but the container it
            # restored then is there: preflight proved the name was free before.
            return pb.RestoreResult()

    async def preflight(self) -> None:
        """Refuse before anything is frozen: every reason here leaves the source untouched."""
        src_info, dst_info = await self.source.host_info(), await self.destination.host_info()
        c = await self.source.inspect(self.container)
        if c.state != "running":
            raise FailedPrecondition(f"{self.container} on {self.source.name} is {c.state}, not running")
        if src_info.runtime != dst_info.runtime:
            raise FailedPrecondition(f"{self.source.name} runs {src_info.runtime}, "
                                     f"{self.destination.name} runs {dst_info.runtime}")
        if self.post_copy:
            if src_info.runtime != "podman":
                raise FailedPrecondition(f"post-copy needs podman; {self.source.name} runs {src_info.runtime}")
            if not dst_info.criu_features.get("uffd-noncoop"):
                raise FailedPrecondition(f"post-copy needs userfaultfd on {self.destination.name} "
                                         f"(criu check --feature uffd-noncoop fails there)")
        if not dst_info.criu_version:
            raise FailedPrecondition(f"{self.destination.name} has no working CRIU")
        if _version(dst_info.criu_version) < _version(src_info.criu_version):
            raise FailedPrecondition(f"CRIU on {self.destination.name} ({dst_info.criu_version}) is older "
                                     f"than on {self.source.name} ({src_info.criu_version})")
        # Iterative pre-copy (dumping memory while the container runs, then only what changed) needs
        # the kernel to track soft-dirty pages; say why the freeze covers all memory.
        self.pre_copy = ("not implemented yet" if src_info.pre_copy_possible else
                         f"impossible: {self.source.name}'s kernel does not track soft-dirty pages "
                         f"(criu check --feature mem_dirty_track fails; CONFIG_MEM_SOFT_DIRTY is off)")
        try:
            await self.destination.inspect(self.container)
            raise AlreadyExists(f"a container named {self.container!r} already exists on "
                                f"{self.destination.name}; remove it first")
        except NotFound:
            pass
        # CPU compatibility (CRIU's own check) and room for the checkpoint, on the destination.
        needs = await self.source.describe_for_migration(self.container)
        # Pages land in files on the destination only in a direct stop-and-copy migration.
        needs.pool_pages = self.transfer == "direct" and not self.post_copy
        await self.destination.check_migration(needs)

    async def rollback(self, job: "Job", cause: StasisError) -> None:
        if self.post_copy_dump is not None:
            # What is safe depends on how the source's dump ends: a destination that failed after
            # its last page can fail before the source's call returns. A dump still serving pages
            # ends when the source's relay breaks, or when the resume below aborts it.
            await asyncio.wait([self.post_copy_dump], timeout=POST_COPY_END)
        if self.post_copy and job.result.get("memory_left") == "true":
            # The source's images hold no memory (a lazy dump's pages were served, not written): it
            # cannot be resumed, and removing the destination's container would lose the workload.
            async with self.jobs.phase(job, "rollback"):
                pass
            job.row.error = (f"{cause.message}; not rolled back: every page of {self.container} had left "
                             f"{self.source.name}, so the container on {self.destination.name} is its only copy. "
                             f"Check it there ('stasis ps --host {self.destination.name}'); nothing was removed")
            job.row.state = "failed"
            return
        async with self.jobs.phase(job, "rollback"):
            problems = []
            if self.restore_started:  # never touch a destination container this job did not start
                try:
                    await self.destination.remove(self.container, force=True)
                except NotFound:
                    pass
                except StasisError as exc:
                    problems.append(f"destination clean-up: {exc.message}")
                    if self.destination_restoring and isinstance(exc, (Unavailable, DeadlineExceeded)):
                        # Its agent is gone, not its host's runtime: a copy it made may run there.
                        problems.append(f"{self.container} may also run on {self.destination.name} until its "
                                        f"agent is back, which then removes it (an agent removes the restores "
                                        f"it began and never reported)")
            try:
                await self.source.resume(self.container)
            except StasisError as exc:
                problems.append(f"source resume: {exc.message}")
        job.row.error = cause.message + (f"; rollback problems: {'; '.join(problems)}" if problems else
                                         f"; rolled back: {self.container} runs on {self.source.name}")
        job.row.state = "failed" if problems else "rolled_back"
