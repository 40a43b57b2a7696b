"""The migration state machine and job bookkeeping, over fake agents.

The fakes stand in for AgentClient, whose real behaviour the end-to-end tests cover; here every
failure can be placed at an exact phase.
"""

from __future__ import annotations

import asyncio

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

    def _maybe_fail(self, what: str):
        self.calls.append(what)
        if what in self.fail:
            raise RuntimeFailure(f"{what} failed on {self.name}")

    async def host_info(self):
        return pb.HostInfo(name=self.name, runtime="podman", criu_version=self.criu)

    async def inspect(self, name):
        self._maybe_fail("inspect")
        if name not in self.containers:
            raise NotFound(f"no container {name!r} on {self.name}")
        return pb.Container(id="id-" + name, name=name, state=self.containers[name])

    async def checkpoint(self, op_id, container, leave_running, repository, on_progress, direct=False):
        self.direct = direct
        self._maybe_fail("checkpoint")
        on_progress(pb.Progress(phase="dump"))
        self.containers[container] = "exited"
        return pb.CheckpointSummary(id="0123456789abcdef", host=self.name, container_name=container,
                                    timings=[pb.PhaseTiming(name="frozen", seconds=0.5)])

    async def restore(self, op_id, checkpoint_id, repository, name, on_progress, peer=None, ticket=b""):
        self.peer = peer
        self._maybe_fail("restore")
        self.containers[name] = "running"
        return pb.RestoreResult(container=pb.Container(name=name, state="running"))

    async def resume(self, name):
        self._maybe_fail("resume")
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


async def migrate(service, src, dst):
    job = service.jobs.start("migrate", {}, "", Migration(service, src, dst, "web").run)
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
    assert job.result["checkpoint_id"] == "0123456789abcdef" and job.result["cleanup"] == "done"
    assert job.timings["source.frozen"] == 0.5
    assert service.store.job(job.id).state == "succeeded"   # persisted


async def test_restore_failure_rolls_back_to_running_source(service):
    src, dst = FakeAgent("a", containers={"web": "running"}), FakeAgent("b", fail={"restore"})
    job = await migrate(service, src, dst)
    assert job.row.state == "rolled_back"
    assert "restore failed on b" in job.row.error and "runs on a" in job.row.error
    assert src.containers["web"] == "running" and "resume" in src.calls
    assert "remove" in dst.calls          # whatever the destination started is removed
    assert sum(s == "running" for s in (*src.containers.values(), *dst.containers.values())) == 1


async def test_checkpoint_failure_never_touches_destination(service):
    src, dst = FakeAgent("a", containers={"web": "running"}, fail={"checkpoint"}), FakeAgent("b")
    job = await migrate(service, src, dst)
    assert job.row.state == "rolled_back"
    assert "remove" not in dst.calls and "restore" not in dst.calls


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


async def test_stopped_source_is_refused(service):
    job = await migrate(service, FakeAgent("a", containers={"web": "exited"}), FakeAgent("b"))
    assert job.row.state == "failed" and "not running" in job.row.error


async def test_cleanup_failure_after_commit_does_not_undo(service):
    src, dst = FakeAgent("a", containers={"web": "running"}, fail={"remove"}), FakeAgent("b")
    job = await migrate(service, src, dst)
    assert job.row.state == "succeeded"
    assert job.result["cleanup"].startswith("failed: remove failed")
    assert dst.containers["web"] == "running"


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


async def test_restart_marks_unfinished_jobs_failed(tmp_path):
    store = Store(str(tmp_path / "c.db"))
    row = store.create_job("j1", "migrate", {})
    row.phase = "restore"
    store.save_job(row)
    JobManager(store)
    assert store.job("j1").state == "failed"
    assert "controller restarted during phase restore" in store.job("j1").error


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
        async def restore(self, op_id, checkpoint_id, repository, name, on_progress, peer=None, ticket=b""):
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
