"""The migration state machine and job bookkeeping, over fake agents.

The fakes stand in for AgentClient, whose real behaviour the end-to-end tests cover; here every
failure can be placed at an exact phase.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from stasis.controller.jobs import JobManager
from stasis.controller.migrate import Migration
from stasis.controller.service import ControllerService
from stasis.controller.store import Store
from stasis.errors import NotFound, RuntimeFailure
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.storage.repository import Repository


class FakeAgent:
    def __init__(self, name: str, criu: str = "4.1.1", containers=None, fail=None):
        self.name = name
        self.criu = criu
        self.containers = dict(containers or {})
        self.fail = set(fail or ())
        self.calls: list[str] = []
        self.dumped: asyncio.Future | None = None   # a direct transfer's seal: the dump's outcome

    def _outcome(self) -> asyncio.Future:
        if self.dumped is None:
            self.dumped = asyncio.get_running_loop().create_future()
        return self.dumped

    def _maybe_fail(self, what: str):
        self.calls.append(what)
        if what in self.fail:
            raise RuntimeFailure(f"{what} failed on {self.name}")

    async def host_info(self):
        return pb.HostInfo(name=self.name, runtime="podman", criu_version=self.criu,
                           criu_features={"uffd-noncoop": True})

    async def describe_for_migration(self, name):
        return pb.MigrationNeeds(container=name, cpuinfo=b"cpu of " + self.name.encode(), memory_bytes=1 << 20)

    async def check_migration(self, needs):
        self._maybe_fail("check")
        assert needs.cpuinfo.startswith(b"cpu of ")

    async def inspect(self, name):
        self._maybe_fail("inspect")
        if name not in self.containers:
            raise NotFound(f"no container {name!r} on {self.name}")
        return pb.Container(id="id-" + name, name=name, state=self.containers[name])

    async def checkpoint(self, op_id, container, leave_running, repository, on_progress, direct=False,
                         checkpoint_id="", ignore_volumes=False, post_copy=False):
        self.direct = direct
        await asyncio.sleep(0.01)   # the destination's fetch begins meanwhile
        if post_copy:   # like CRIU's lazy dump: the archive goes, then memory until the last page
            on_progress(pb.Progress(phase="dump"))
            self._outcome().set_result(True)
            self.serving = asyncio.get_running_loop().create_future()
            if not await self.serving:   # the resume aborted it: the container runs on here
                raise RuntimeFailure(f"the post-copy dump on {self.name} was aborted")
            await asyncio.sleep(0.05)   # CRIU ends a little after its last page left
            self.containers[container] = "exited"
            return pb.CheckpointSummary(id=checkpoint_id, host=self.name, container_name=container)
        try:
            self._maybe_fail("checkpoint")
        except RuntimeFailure as exc:
            if not self._outcome().done():
                self._outcome().set_exception(exc)
            raise
        on_progress(pb.Progress(phase="dump"))
        self.containers[container] = "exited"
        if not self._outcome().done():
            self._outcome().set_result(True)
        return pb.CheckpointSummary(id=checkpoint_id or "0123456789abcdef", host=self.name, container_name=container,
                                    timings=[pb.PhaseTiming(name="frozen", seconds=0.5)])

    async def restore(self, op_id, checkpoint_id, repository, name, on_progress, peer=None, ticket=b"",
                      ignore_volumes=False, post_copy=False, page_ticket=b""):
        self.peer = peer
        if post_copy:   # runs first; every page then comes from the source
            await peer._outcome()
            self.containers[name] = "running"
            on_progress(pb.Progress(phase="running"))
            self._maybe_fail("pages")   # lost mid-copy
            while not hasattr(peer, "serving"):
                await asyncio.sleep(0.001)
            peer.serving.set_result(True)
            self._maybe_fail("restore")   # lost after the last page, before its call returned
            return pb.RestoreResult(container=pb.Container(name=name, state="running"))
        if peer is not None:   # like the real thing: nothing is restored without the source's seal
            await peer._outcome()
        self._maybe_fail("restore")
        self.containers[name] = "running"
        return pb.RestoreResult(container=pb.Container(name=name, state="running"))

    async def resume(self, name):
        self._maybe_fail("resume")
        if hasattr(self, "serving") and not self.serving.done():
            self.serving.set_result(False)
        self.containers[name] = "running"
        return pb.Container(name=name, state="running")

    async def remove(self, name, force=True):
        self._maybe_fail("remove")
        if name not in self.containers:
            raise NotFound(name)
        del self.containers[name]


@pytest.fixture
def service(tmp_path):
    repo = Repository.init(f"memory://{tmp_path.name}", None, encrypt=False)
    return ControllerService(Store(str(tmp_path / "c.db")), repo)


async def migrate(service, src, dst, post_copy=False):
    job = service.jobs.start("migrate", {}, "", Migration(service, src, dst, "web", post_copy=post_copy).run)
    await job.done.wait()
    return job


async def test_success_runs_every_phase_in_order(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b")
    job = await migrate(service, src, dst)
    assert job.row.state == "succeeded", job.row.error
    phases = [k for k in job.timings if "." not in k]
    assert phases == ["preflight", "checkpoint", "restore", "verify", "commit", "cleanup"]
    assert job.row.downtime > 0
    assert "web" not in src.containers and dst.containers["web"] == "running"
    assert len(job.result["checkpoint_id"]) == 16 and job.result["cleanup"] == "done"
    assert src.direct and dst.peer is src and job.result["transfer"] == "direct"
    assert job.timings["source.frozen"] == 0.5
    assert job.result["pre_copy"].startswith("impossible: a's kernel does not track soft-dirty pages")
    assert service.store.job(job.id).state == "succeeded"   # persisted


async def test_restore_failure_rolls_back_to_running_source(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b", fail={"restore"})
    job = await migrate(service, src, dst)
    assert job.row.state == "rolled_back"
    assert "restore failed on b" in job.row.error and "runs on a" in job.row.error
    assert src.containers["web"] == "running" and "resume" in src.calls
    assert "remove" in dst.calls          # whatever the destination started is removed
    assert sum(s == "running" for s in (*src.containers.values(), *dst.containers.values())) == 1


async def test_checkpoint_failure_never_restores_on_the_destination(service):
    src, dst = FakeAgent("a", containers={"web": "running"}, fail={"checkpoint"}), FakeAgent("b")
    job = await migrate(service, src, dst)
    assert job.row.state == "rolled_back"
    assert "web" not in dst.containers and src.containers["web"] == "running"


async def test_via_repository_restores_only_after_the_checkpoint(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b")
    job = service.jobs.start("migrate", {}, "", Migration(service, src, dst, "web", "repository").run)
    await job.done.wait()
    assert job.row.state == "succeeded" and not src.direct and dst.peer is None
    assert job.result["transfer"] == "repository"


@pytest.mark.parametrize("src_criu,dst_criu,dst_containers,problem", [
    ("4.1.1", "3.17.1", {}, "older"),
    ("4.1.1", "", {}, "no working CRIU"),
    ("4.1.1", "4.1.1", {"web": "running"}, "already exists"),
])
async def test_preflight_refuses_before_anything_is_frozen(service, src_criu, dst_criu, dst_containers, problem):
    src = FakeAgent("a", criu=src_criu, containers={"web": "running"})
    dst = FakeAgent("b", criu=dst_criu, containers=dst_containers)
    job = await migrate(service, src, dst)
    assert job.row.state == "failed" and problem in job.row.error
    assert "checkpoint" not in src.calls and src.containers["web"] == "running"
    assert dst.containers == dst_containers


async def test_a_destination_that_cannot_take_it_is_refused_in_preflight(service):
    src = FakeAgent("a", containers={"web": "running"})
    dst = FakeAgent("b", fail={"check"})
    job = await migrate(service, src, dst)
    assert job.row.state == "failed" and "check failed on b" in job.row.error
    assert "checkpoint" not in src.calls and src.containers["web"] == "running"


async def test_stopped_source_is_refused(service):
    job = await migrate(service, FakeAgent("a", containers={"web": "exited"}), FakeAgent("b"))
    assert job.row.state == "failed" and "not running" in job.row.error


async def test_cleanup_failure_after_commit_does_not_undo(service):
    src, dst = FakeAgent("a", containers={"web": "running"}, fail={"remove"}), FakeAgent("b")
    job = await migrate(service, src, dst)
    assert job.row.state == "succeeded"
    assert job.result["cleanup"].startswith("failed: remove failed")
    assert dst.containers["web"] == "running"


async def test_post_copy_runs_on_the_destination_before_the_source_lets_go(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b")
    job = await migrate(service, src, dst, post_copy=True)
    assert job.row.state == "succeeded", job.row.error
    assert job.result["mode"] == "post-copy" and job.result["memory_left"] == "true"
    assert "web" not in src.containers and dst.containers["web"] == "running"


async def test_post_copy_losing_the_destination_mid_copy_resumes_the_source(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b", fail={"pages"})
    job = await migrate(service, src, dst, post_copy=True)
    assert job.row.state == "rolled_back", job.row.error
    assert src.containers["web"] == "running" and "web" not in dst.containers
    assert "memory_left" not in job.result


async def test_post_copy_failing_after_the_last_page_keeps_the_only_copy(service):
    """The source's images hold no memory once its lazy dump ended: resuming it cannot work, and
    removing the destination's container would lose the workload."""
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b", fail={"restore"})
    job = await migrate(service, src, dst, post_copy=True)
    assert job.row.state == "failed"
    assert "not rolled back" in job.row.error and "only copy" in job.row.error and "restore failed" in job.row.error
    assert dst.containers["web"] == "running" and "remove" not in dst.calls
    assert "resume" not in src.calls and src.containers["web"] == "exited"


async def test_failed_rollback_is_reported_as_failed(service):
    src = FakeAgent("a", containers={"web": "running"}, fail={"resume"})
    dst = FakeAgent("b", fail={"restore"})
    job = await migrate(service, src, dst)
    assert job.row.state == "failed"
    assert "rollback problems" in job.row.error and "resume failed" in job.row.error


async def test_request_id_attaches_to_the_same_job(service):
    runs = []

    async def work(job):
        runs.append(job.id)
        await asyncio.sleep(0.05)

    first = service.jobs.start("checkpoint", {}, "req-1", work)
    second = service.jobs.start("checkpoint", {}, "req-1", work)
    assert first is second
    await first.done.wait()
    assert runs == ["req-1"]
    assert service.jobs.start("checkpoint", {}, "req-1", work).row.state == "succeeded"


async def test_watch_sees_every_phase_then_ends(service):
    async def work(job):
        for name in ("one", "two"):
            async with service.jobs.phase(job, name):
                await asyncio.sleep(0.01)

    job = service.jobs.start("checkpoint", {}, "", work)
    phases = [e.job.phase async for e in service.jobs.watch(job)]
    assert "one" in phases and "two" in phases
    assert (await anext(aiter(service.jobs.watch(job)))).job.state == "succeeded"


async def test_restart_fails_unfinished_jobs_but_keeps_migrations_for_recovery(tmp_path):
    store = Store(str(tmp_path / "c.db"))
    for ident, kind in (("j1", "checkpoint"), ("j2", "migrate")):
        row = store.create_job(ident, kind, {})
        row.phase = "restore"
        store.save_job(row)
    manager = JobManager(store)
    assert store.job("j1").state == "failed"
    assert "controller restarted during phase restore" in store.job("j1").error
    assert [r.id for r in manager.interrupted] == ["j2"] and store.job("j2").state == "running"


class Remembering(FakeAgent):
    """An agent whose restarted process forgot the controller's first restore call."""

    async def restore(self, op_id, checkpoint_id, repository, name, on_progress, peer=None, ticket=b"",
                      ignore_volumes=False):
        from stasis.errors import AlreadyExists

        self.calls.append("restore")
        if name in self.containers:
            raise AlreadyExists(f"a container named {name!r} already exists")
        self.containers[name] = "running"
        return pb.RestoreResult(container=pb.Container(name=name, state="running"))


async def recover(service, src, dst, phase, state="running", result=None):
    """A job as a killed controller left it, then picked up by a new one."""
    row = service.store.create_job(f"job-{phase}-{uuid.uuid4().hex[:6]}", "migrate",
                                   {"host": "a", "container": "web", "to": "b", "transfer": "direct"})
    row.phase, row.state = phase, state
    row.result = json.dumps(result or {})
    service.store.save_job(row)
    job = service.jobs.resume(service.store.job(row.id), Migration(service, src, dst, "web").recover)
    await job.done.wait()
    return job


def running_copies(*agents) -> int:
    return sum(a.containers.get("web") == "running" for a in agents)


async def test_recovery_from_preflight_changes_nothing(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b")
    job = await recover(service, src, dst, "preflight")
    assert job.row.state == "failed" and "nothing was changed" in job.row.error
    assert src.calls == [] and dst.calls == [] and running_copies(src, dst) == 1


@pytest.mark.parametrize("phase,src_state,dst_state,result", [
    ("checkpoint", "running", None, {}),                       # the dump had not happened yet
    ("checkpoint", "exited", None, {}),                        # it had: the agent replays it
    ("restore", "exited", None, {"checkpoint_id": "0123456789abcdef", "restore_started": "true"}),
    ("restore", "exited", "running", {"checkpoint_id": "0123456789abcdef", "restore_started": "true"}),
    ("verify", "exited", "running", {"checkpoint_id": "0123456789abcdef", "restore_started": "true"}),
    ("commit", "exited", "running", {"checkpoint_id": "0123456789abcdef", "restore_started": "true"}),
])
async def test_recovery_completes_the_migration_with_one_running_copy(service, phase, src_state, dst_state, result):
    src = FakeAgent("a", containers={"web": src_state})
    dst = Remembering("b", containers={"web": dst_state} if dst_state else {})
    job = await recover(service, src, dst, phase, result=result)
    assert job.row.state == "succeeded", job.row.error
    assert "web" not in src.containers and dst.containers["web"] == "running"
    assert job.result["recovered"].endswith(f"phase {phase}") and job.result["cleanup"] == "done"


async def test_recovery_of_a_committed_job_only_cleans_up(service):
    src, dst = FakeAgent("a", containers={"web": "exited"}), FakeAgent("b", containers={"web": "running"})
    job = await recover(service, src, dst, "cleanup", state="succeeded", result={"checkpoint_id": "x"})
    assert job.row.state == "succeeded" and job.result["cleanup"] == "done"
    assert "web" not in src.containers and dst.calls == []


async def test_recovery_rolls_back_when_the_destination_lost_it(service):
    src, dst = FakeAgent("a", containers={"web": "exited"}), FakeAgent("b")
    job = await recover(service, src, dst, "commit", result={"checkpoint_id": "x", "restore_started": "true"})
    assert job.row.state == "rolled_back" and src.containers["web"] == "running"
    assert running_copies(src, dst) == 1


async def test_recovery_continues_an_interrupted_rollback(service):
    src, dst = FakeAgent("a", containers={"web": "exited"}), FakeAgent("b", containers={"web": "running"})
    job = await recover(service, src, dst, "rollback", result={"restore_started": "true"})
    assert job.row.state == "rolled_back" and src.containers["web"] == "running" and "web" not in dst.containers
    # A rollback caused by someone else's container on the destination leaves that container alone.
    src, dst = FakeAgent("a", containers={"web": "exited"}), FakeAgent("b", containers={"web": "running"})
    job = await recover(service, src, dst, "rollback", result={"restore_started": "false"})
    assert job.row.state == "rolled_back" and dst.containers["web"] == "running" and "remove" not in dst.calls


async def test_request_id_reused_for_other_work_is_refused(service):
    from stasis.errors import AlreadyExists

    async def work(job):
        pass

    job = service.jobs.start("checkpoint", {"container": "web"}, "req-2", work)
    await job.done.wait()
    with pytest.raises(AlreadyExists, match="another checkpoint job"):
        service.jobs.start("checkpoint", {"container": "db"}, "req-2", work)


async def test_name_taken_at_restore_time_is_not_removed(service):
    from stasis.errors import AlreadyExists

    class Racing(FakeAgent):
        async def restore(self, op_id, checkpoint_id, repository, name, on_progress, peer=None, ticket=b"",
                          ignore_volumes=False):
            self.containers[name] = "running"   # someone else's container appeared after preflight
            raise AlreadyExists(f"a container named {name!r} already exists")

    src, dst = FakeAgent("a", containers={"web": "running"}), Racing("b")
    job = await migrate(service, src, dst)
    assert job.row.state == "rolled_back"
    assert "remove" not in dst.calls and dst.containers["web"] == "running"
    assert src.containers["web"] == "running"


async def test_client_reattaches_with_the_same_operation_id(monkeypatch):
    from stasis.controller import agents
    from stasis.errors import Unavailable

    monkeypatch.setattr(agents, "REATTACH", (0, 0))
    seen = []

    def method(request, timeout):
        seen.append(request.operation_id)

        async def events():
            if len(seen) == 1:
                raise Unavailable("connection reset")
            yield pb.AgentEvent(progress=pb.Progress(phase="restore"))
            yield pb.AgentEvent(restored=pb.RestoreResult(container=pb.Container(name="web")))
        return events()

    client = agents.AgentClient("b", "127.0.0.1:1")
    event = await client._stream(method, pb.AgentRestoreRequest(operation_id="op-7"), lambda p: None)
    await client.close()
    assert event.restored.container.name == "web" and seen == ["op-7", "op-7"]
