"""Jobs: long operations with persisted phases, timings and results, and live watchers.

A job's row is saved at every phase change, so `stasis job ID` (or a restarted controller) sees
where it got to. Watchers get a snapshot of the job at every change plus the agents' progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import structlog

from stasis.controller.store import JobRow, Store
from stasis.errors import AlreadyExists, InvalidArgument, NotFound, StasisError
from stasis.proto.v1 import stasis_pb2 as pb

log = structlog.get_logger("stasis.controller")
TERMINAL = {"succeeded", "failed", "rolled_back"}


class Job:
    def __init__(self, row: JobRow):
        self.row = row
        self.params: dict[str, Any] = json.loads(row.params)
        self.result: dict[str, str] = json.loads(row.result)
        self.timings: dict[str, float] = json.loads(row.timings)
        self.watchers: set[asyncio.Queue] = set()
        self.done = asyncio.Event()
        if row.state in TERMINAL:
            self.done.set()

    @property
    def id(self) -> str:
        return self.row.id

    def to_pb(self) -> pb.Job:
        r = self.row
        return pb.Job(
            id=r.id, kind=r.kind, state=r.state, phase=r.phase, error=r.error,
            timings=[pb.PhaseTiming(name=k, seconds=v) for k, v in self.timings.items()],
            params={k: str(v) for k, v in self.params.items()}, result=self.result,
            created=_iso(r.created), updated=_iso(r.updated), downtime_seconds=r.downtime)

    def publish(self, progress: pb.Progress | None = None) -> None:
        event = pb.JobEvent(job=self.to_pb(), progress=progress)
        for q in list(self.watchers):
            q.put_nowait(event)


class JobManager:
    def __init__(self, store: Store):
        self.store = store
        self.live: dict[str, Job] = {}
        self._tasks: set[asyncio.Task] = set()
        # Migrations a stopped controller left half done are picked up again (ControllerService.
        # recover_jobs): the source may be frozen. Other kinds only report what happened.
        self.interrupted: list[JobRow] = []
        for row in store.unfinished_jobs():
            if row.kind == "migrate":
                self.interrupted.append(row)
                continue
            row.state, row.error = "failed", f"controller restarted during phase {row.phase or 'start'}"
            store.save_job(row)
        self.interrupted += store.uncleaned_migrations()

    def existing(self, request_id: str, kind: str, params: dict[str, Any]) -> Job | None:
        """The job a retried request already started, or None; refuses an id reused for other work."""
        if not request_id:
            return None
        if len(request_id) > 64 or not request_id.replace("-", "").isalnum():
            raise InvalidArgument("request_id must be at most 64 letters, digits or '-'")
        job = self.get(request_id)
        if job is not None and (job.row.kind != kind or job.params != json.loads(json.dumps(params))):
            raise AlreadyExists(f"request id {request_id} was used for another {job.row.kind} job; "
                                f"use a new id")
        return job

    def start(self, kind: str, params: dict[str, Any], request_id: str,
              work: Callable[[Job], Awaitable[None]]) -> Job:
        """Create a job and run `work` in the background; a known request id returns its job."""
        found = self.existing(request_id, kind, params)
        if found is not None:
            return found
        return self._launch(Job(self.store.create_job(request_id or uuid.uuid4().hex[:12], kind, params)), work)

    def resume(self, row: JobRow, work: Callable[[Job], Awaitable[None]]) -> Job:
        """Run `work` on an existing (interrupted) job."""
        job = Job(row)
        job.done.clear()
        return self._launch(job, work)

    def _launch(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> Job:
        self.live[job.id] = job
        task = asyncio.ensure_future(self._run(job, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, work: Callable[[Job], Awaitable[None]]) -> None:
        try:
            await work(job)
            if job.row.state == "running":
                job.row.state = "succeeded"
        except StasisError as exc:
            job.row.state = "failed" if job.row.state == "running" else job.row.state
            job.row.error = job.row.error or exc.message
        except Exception as exc:  # noqa: BLE001 - a bug must still end the job, with its trace in the log
            log.error("job crashed", job=job.id, exc_info=exc)
            job.row.state, job.row.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self.save(job)
            job.done.set()
            job.publish()
            self.live.pop(job.id, None)   # finished jobs are read back from the store
            log.info("job finished", job=job.id, kind=job.row.kind, state=job.row.state,
                     error=job.row.error or None)

    def save(self, job: Job) -> None:
        job.row.result = json.dumps(job.result)
        job.row.timings = json.dumps(job.timings)
        self.store.save_job(job.row)

    @contextlib.asynccontextmanager
    async def phase(self, job: Job, name: str):
        """Record a phase: persisted when it starts, timed when it ends (even when it fails)."""
        job.row.phase = name
        self.save(job)
        job.publish(pb.Progress(phase=name, message=f"{name} started"))
        started = time.monotonic()
        try:
            yield
        finally:
            job.timings[name] = round(job.timings.get(name, 0.0) + time.monotonic() - started, 4)
            self.save(job)

    def get(self, job_id: str) -> Job | None:
        if job_id in self.live:
            return self.live[job_id]
        row = self.store.job(job_id)
        return Job(row) if row else None

    def require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}; list them with 'stasis jobs'")
        return job

    async def watch(self, job: Job) -> AsyncIterator[pb.JobEvent]:
        queue: asyncio.Queue = asyncio.Queue()
        job.watchers.add(queue)
        try:
            yield pb.JobEvent(job=job.to_pb())
            while not job.done.is_set() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                waiter = asyncio.ensure_future(job.done.wait())
                try:
                    finished, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    if not getter.done():
                        getter.cancel()
                if getter in finished:
                    yield getter.result()
            yield pb.JobEvent(job=job.to_pb())
        finally:
            job.watchers.discard(queue)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
