"""Scheduled backups: definitions, the loop that runs them, hooks, and retention after each run.

A backup is a checkpoint taken with the container left running (CRIU's frozen time is recorded
by the agent), tagged with its schedule. Runs of one host are serialised, so a host is never
frozen by several dumps at once; different hosts run in parallel. A schedule whose run was missed
(controller down) runs once when the controller is back: the next run is computed from "now",
never replayed.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import structlog
from croniter import croniter
from google.protobuf import json_format

from stasis.controller.retention import Policy, decide
from stasis.controller.store import ScheduleRow
from stasis.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, StasisError
from stasis.proto.v1 import stasis_pb2 as pb

if TYPE_CHECKING:
    from stasis.controller.jobs import Job
    from stasis.controller.service import ControllerService

log = structlog.get_logger("stasis.controller")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


def policy_of(p: pb.RetentionPolicy) -> Policy:
    return Policy(p.keep_last, p.keep_hourly, p.keep_daily, p.keep_weekly, p.keep_monthly, p.keep_within_seconds)


def next_after(spec: pb.Schedule, now: float) -> float:
    if spec.cron:
        return croniter(spec.cron, datetime.fromtimestamp(now, timezone.utc)).get_next(float)
    return now + spec.every_seconds


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else ""


def _ts(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


class Schedules:
    def __init__(self, service: "ControllerService", tick: float = 0.5):
        self.service = service
        self.store = service.store
        self.tick = tick
        self.running: set[str] = set()
        self._host_locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- definitions

    def create(self, spec: pb.Schedule) -> pb.Schedule:
        self._validate(spec)
        if self.store.schedule(spec.name) is not None:
            raise AlreadyExists(f"schedule {spec.name!r} exists; delete it first or pick another name")
        now = time.time()
        row = ScheduleRow(name=spec.name, spec=json_format.MessageToJson(spec), paused=spec.paused,
                          last_run=0.0, next_run=next_after(spec, now), last_result="")
        self.store.save_schedule(row)
        log.info("schedule created", schedule=spec.name)
        return self._pb(row)

    def _validate(self, spec: pb.Schedule) -> None:
        if not NAME.match(spec.name):
            raise InvalidArgument(f"schedule name {spec.name!r} is invalid: lowercase letters, digits, '.', '_', '-'")
        if bool(spec.selector) == bool(spec.labels):
            raise InvalidArgument("give either --selector [HOST/]CONTAINER or --label KEY=VALUE, not both")
        if bool(spec.every_seconds) == bool(spec.cron):
            raise InvalidArgument("give either --every DURATION or --cron EXPRESSION")
        if spec.cron and not croniter.is_valid(spec.cron):
            raise InvalidArgument(f"cron expression {spec.cron!r} is invalid (five fields, e.g. '0 3 * * *')")
        if spec.every_seconds and spec.every_seconds < 1:
            raise InvalidArgument("--every must be at least 1s")
        if spec.hook_on_error not in ("", "fail", "continue"):
            raise InvalidArgument("--hook-on-error is fail or continue")
        if any(v < 0 for v in (spec.retention.keep_last, spec.retention.keep_hourly, spec.retention.keep_daily,
                               spec.retention.keep_weekly, spec.retention.keep_monthly)):
            raise InvalidArgument("keep counts cannot be negative")

    def _row(self, name: str) -> ScheduleRow:
        row = self.store.schedule(name)
        if row is None:
            raise NotFound(f"no schedule {name!r}; list them with 'stasis schedule list'")
        return row

    @staticmethod
    def _spec(row: ScheduleRow) -> pb.Schedule:
        return json_format.Parse(row.spec, pb.Schedule())

    def _pb(self, row: ScheduleRow) -> pb.Schedule:
        spec = self._spec(row)
        spec.paused = row.paused
        spec.last_run, spec.next_run, spec.last_result = _iso(row.last_run), _iso(row.next_run), row.last_result
        if row.paused:
            spec.next_run = ""
        return spec

    def get(self, name: str) -> pb.Schedule:
        return self._pb(self._row(name))

    def list(self) -> list[pb.Schedule]:
        return [self._pb(r) for r in self.store.schedules()]

    def pause(self, name: str, paused: bool) -> pb.Schedule:
        row = self._row(name)
        row.paused = paused
        if not paused:   # resuming does not replay what was skipped while paused
            row.next_run = next_after(self._spec(row), time.time())
        self.store.save_schedule(row)
        return self._pb(row)

    def delete(self, name: str) -> None:
        if not self.store.delete_schedule(name):
            raise NotFound(f"no schedule {name!r}")

    # ---------------------------------------------------------------- running

    async def loop(self, grace: float | None = None) -> None:
        # After a restart, agents re-register within a heartbeat or two: missed runs wait for them
        # rather than failing on "host is down".
        await asyncio.sleep(3 * self.service.heartbeat_seconds + 1 if grace is None else grace)
        while True:
            try:
                self.tick_once(time.time())
            except Exception as exc:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.error("scheduler tick failed", exc_info=exc)
            await asyncio.sleep(self.tick)

    def tick_once(self, now: float) -> list[str]:
        """Start every due schedule once; returns their names. The next run is computed from now,
        so runs missed while the controller was down collapse into this one."""
        started = []
        for row in self.store.schedules():
            if row.paused or row.next_run > now or row.name in self.running:
                continue
            spec = self._spec(row)
            row.last_run, row.next_run = now, next_after(spec, now)
            self.store.save_schedule(row)   # persisted before running: a crash never replays it
            self._spawn(self.run(spec))
            started.append(row.name)
        return started

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run_now(self, name: str) -> list[str]:
        spec = self._spec(self._row(name))
        self.running.add(spec.name)
        try:
            jobs = await self.start_backups(spec)
        except BaseException:
            self.running.discard(spec.name)
            raise
        self._spawn(self._finish(spec, jobs))
        return [j.id for j in jobs]

    async def run(self, spec: pb.Schedule) -> None:
        self.running.add(spec.name)   # from here until its backups end, the loop will not start it again
        try:
            jobs = await self.start_backups(spec)
        except BaseException as exc:
            self.running.discard(spec.name)
            if not isinstance(exc, StasisError):
                raise
            self._result(spec.name, f"failed: {exc.message}")
            return
        await self._finish(spec, jobs)

    async def _finish(self, spec: pb.Schedule, jobs: list["Job"]) -> None:
        try:
            await asyncio.gather(*(j.done.wait() for j in jobs))
            ok = sum(j.row.state == "succeeded" for j in jobs)
            errors = [j.row.error for j in jobs if j.row.state != "succeeded"]
            result = f"{ok}/{len(jobs)} backups succeeded" + (f"; {errors[0]}" if errors else "")
            self._result(spec.name, result if jobs else "no container matches the selector")
        finally:
            self.running.discard(spec.name)

    def _result(self, name: str, text: str) -> None:
        row = self.store.schedule(name)
        if row is not None:
            row.last_result = text[:500]
            self.store.save_schedule(row)

    async def targets(self, spec: pb.Schedule) -> list[tuple[str, str]]:
        """(host, container) for every running container the schedule selects. Identity is the
        container name: after a migration the same backups continue on the new host."""
        if spec.labels:
            found = await self.service.containers()
            return [(c.host, c.name) for c in found if c.state == "running"
                    and all(c.labels.get(k) == v for k, v in spec.labels.items())]
        host, _, name = spec.selector.rpartition("/")
        if host:
            return [(host, name)]
        found = await self.service.containers()
        return [(c.host, c.name) for c in found if c.name == name and c.state == "running"][:1]

    async def start_backups(self, spec: pb.Schedule) -> list["Job"]:
        return [self.service.jobs.start("backup", {"schedule": spec.name, "host": host, "container": name}, "",
                                        lambda job, h=host, n=name: self._backup(job, spec, h, n))
                for host, name in await self.targets(spec)]

    async def _backup(self, job: "Job", spec: pb.Schedule, host: str, container: str) -> None:
        jobs = self.service.jobs
        agent = self.service.agent(host)
        lock = self._host_locks.setdefault(host, asyncio.Lock())
        async with jobs.phase(job, "queued"):
            await lock.acquire()   # one dump at a time per host
        try:
            if spec.pre_hook:
                async with jobs.phase(job, "pre_hook"):
                    await self._hook(agent, container, spec, spec.pre_hook, "pre-hook", job)
            async with jobs.phase(job, "checkpoint"):
                summary = await agent.checkpoint(job.id, container, True, self.service.repository.url,
                                                 lambda p: job.publish(p), tags={"schedule": spec.name})
            self.service.record(summary)
            job.result.update(checkpoint_id=summary.id, host=host, container=container,
                              new_bytes=str(summary.new_bytes))
            for t in summary.timings:
                job.timings[f"agent.{t.name}"] = round(t.seconds, 4)
            if spec.post_hook:
                async with jobs.phase(job, "post_hook"):
                    await self._hook(agent, container, spec, spec.post_hook, "post-hook", job)
        finally:
            lock.release()
        async with jobs.phase(job, "retention"):
            forgotten = await self.apply_retention(spec.name, container, policy_of(spec.retention), prune=True)
            job.result["forgotten"] = str(len(forgotten.forgotten))

    async def _hook(self, agent, container: str, spec: pb.Schedule, command: str, what: str, job: "Job") -> None:
        timeout = spec.hook_timeout_seconds or 60.0
        try:
            reply = await agent.exec(container, ["sh", "-c", command], timeout)
            problem = None if reply.exit_code == 0 else f"{what} exited {reply.exit_code}: {reply.output[-300:]}"
        except StasisError as exc:
            problem = f"{what} failed: {exc.message}"
        if problem is None:
            job.result[what] = "ok"
            return
        if spec.hook_on_error == "continue":
            job.result[what] = f"failed, continued: {problem}"
            return
        raise FailedPrecondition(problem + ("; no backup was taken" if what == "pre-hook" else ""))

    # ---------------------------------------------------------------- retention

    async def apply_retention(self, schedule: str, container: str, policy: Policy, dry_run: bool = False,
                              prune: bool = True) -> pb.ForgetResponse:
        from stasis.storage import maintenance

        rows = self.service.store.checkpoints(container=container, schedule=schedule)
        keep = decide([(r.id, _ts(r.created)) for r in rows], policy, time.time())
        forget = [r.id for r in rows if r.id not in keep]
        reply = pb.ForgetResponse(kept=sorted(keep), forgotten=forget,
                                  reasons={k: ",".join(v) for k, v in keep.items()})
        if dry_run or not forget:
            return reply
        repo = self.service.repository
        for ident in forget:
            try:
                await asyncio.to_thread(repo.remove_checkpoint, ident)
            except NotFound:
                pass
            self.service.store.forget_checkpoint(ident)
        log.info("retention forgot backups", schedule=schedule, container=container, count=len(forget))
        if prune:
            try:
                report = await asyncio.to_thread(maintenance.prune, repo, False, maintenance.REPACK_THRESHOLD, 60.0)
                reply.bytes_freed = report["bytes_freed"]
            except FailedPrecondition as exc:   # writers kept it busy: the next run frees the space
                log.warning("prune after retention skipped", error=exc.message)
        return reply

    async def forget(self, request: pb.ForgetRequest) -> pb.ForgetResponse:
        policy = policy_of(request.policy)
        if policy.empty and request.schedule:
            policy = policy_of(self._spec(self._row(request.schedule)).retention)
        if policy.empty:
            raise InvalidArgument("give a policy (--keep-last, --keep-daily, ...) or a schedule that has one")
        containers = [request.container] if request.container else sorted(
            {r.container_name for r in self.service.store.checkpoints(schedule=request.schedule)})
        total = pb.ForgetResponse()
        for c in containers:
            part = await self.apply_retention(request.schedule, c, policy, request.dry_run, request.prune)
            total.kept.extend(part.kept)
            total.forgotten.extend(part.forgotten)
            total.reasons.update(part.reasons)
            total.bytes_freed += part.bytes_freed
        return total

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()

