"""AgentService over a fake Runtime (podman itself is covered by the end-to-end tests) and a real
local-folder repository: idempotency, image reuse, resume after a failed upload, refusals."""

from __future__ import annotations

import asyncio
import os

import pytest

from stasis.agent.runtime import ContainerInfo, DumpStats, RestoreStats, Runtime
from stasis.agent import restoring
from stasis.agent.restoring import Restoring, Unfinished
from stasis.agent.service import AgentService
from stasis.errors import (AlreadyExists, FailedPrecondition, IntegrityError, NotFound, PermissionDenied,
                           RuntimeFailure, StasisError)
from stasis.storage.repository import Repository

IMAGE_ID = "a" * 64


class FakeRuntime(Runtime):
    name = "podman"

    def __init__(self):
        self.containers: dict[str, ContainerInfo] = {}
        self.images = {IMAGE_ID}
        self.calls: list[str] = []
        self.archives: dict[str, bytes] = {}
        self.landing = ""

    async def pages_landing(self):
        return self.landing

    async def version(self):
        return "4.3.1"

    async def list(self, all=False):
        return list(self.containers.values())

    async def inspect(self, name):
        if name not in self.containers:
            raise NotFound(f"no container {name!r}")
        return self.containers[name]

    async def checkpoint(self, name, archive, leave_running, ignore_volumes=False):
        self.calls.append("checkpoint")
        await asyncio.sleep(0.01)
        with open(archive, "wb") as f:
            f.write(b"criu-images-of-" + name.encode() + os.urandom(100_000))
        if not leave_running:
            self.containers[name].state = "exited"
        return DumpStats(0.01, {"frozen_time": 5000})

    async def checkpoint_post_copy(self, name, archive, scratch, ignore_volumes, port, images_ready,
                                   freezing=lambda: None):
        self.calls.append("checkpoint_post_copy")
        freezing()
        with open(archive, "wb") as f:
            f.write(b"criu-images-without-memory")
        await images_ready(0.01)
        self.containers[name].state = "exited"   # every page was taken: the dump ends
        return DumpStats(0.01, {"frozen_time": 5000})

    async def restore(self, archive, name, renamed=True, ignore_volumes=False, pages_port=0, container_id="",
                      pages_dir="", restored=lambda: None, made=lambda _id: None):
        self.calls.append("restore")
        self.archives[name] = open(archive, "rb").read()
        self.containers[name] = ContainerInfo("new-" + name, name, "localhost/x:1", IMAGE_ID, "running")
        return RestoreStats(0.01, "new-" + name, {"restore_time": 2000})

    async def resume(self, name):
        self.calls.append("resume")
        self.containers[name].state = "running"

    async def remove(self, name, force=False):
        self.containers.pop(name)

    async def image_exists(self, image_id):
        return image_id in self.images

    async def exec(self, name, argv, timeout):
        self.calls.append("exec")
        return 0, ""

    async def image_save(self, image, image_id, archive):
        self.calls.append("image_save")
        with open(archive, "wb") as f:
            f.write(b"image-tar" * 1000)

    async def image_load(self, archive):
        self.calls.append("image_load")
        self.images.add(IMAGE_ID)


PASSWORD = "agent-test"


@pytest.fixture(autouse=True)
def cheap_scrypt(monkeypatch):
    monkeypatch.setattr("stasis.storage.keys.SCRYPT_N", 1 << 10)


@pytest.fixture
def repo_url(tmp_path):
    return Repository.init(f"file://{tmp_path}/repo", PASSWORD).url


@pytest.fixture
def agent(tmp_path, repo_url):
    runtime = FakeRuntime()
    runtime.containers["web"] = ContainerInfo("c" * 64, "web", "localhost/x:1", IMAGE_ID, "running")
    return AgentService("host-a", runtime, str(tmp_path / "work"), repo_url, PASSWORD)


def noop(*_args):
    pass


async def test_checkpoint_then_restore_roundtrip(agent, repo_url):
    m = await agent.checkpoint("op1", "web", False, repo_url, "", noop)
    assert m.container.name == "web" and m.timings["frozen"] == 0.005 and m.image is not None
    agent.runtime.containers.pop("web")
    outcome = await agent.restore("op2", m.id[:6], repo_url, "", noop)
    assert outcome.container.name == "web" and outcome.container.state == "running"
    assert agent.runtime.archives["web"].startswith(b"criu-images-of-web")
    assert os.listdir(os.path.join(agent.work_dir, "stage")) == []   # nothing secret left behind


async def test_same_operation_id_runs_once(agent, repo_url):
    a, b = await asyncio.gather(agent.checkpoint("op1", "web", True, repo_url, "", noop),
                                agent.checkpoint("op1", "web", True, repo_url, "", noop))
    assert a.id == b.id and agent.runtime.calls.count("checkpoint") == 1


async def test_image_is_saved_once_then_reused(agent, repo_url):
    await agent.checkpoint("op1", "web", True, repo_url, "", noop)
    await agent.checkpoint("op2", "web", True, repo_url, "", noop)
    assert agent.runtime.calls.count("image_save") == 1


async def test_failed_upload_resumes_the_container(agent, repo_url, monkeypatch):
    url = repo_url

    def broken(*_a, **_k):
        raise StasisError("disk full")
    monkeypatch.setattr(Repository, "store_file", broken)
    with pytest.raises(StasisError, match="disk full.*was resumed on host-a"):
        await agent.checkpoint("op1", "web", False, url, "", noop)
    assert agent.runtime.containers["web"].state == "running" and "resume" in agent.runtime.calls


async def test_a_container_whose_memory_left_by_post_copy_is_never_resumed_from_its_images(agent, repo_url):
    await agent.checkpoint("op1", "web", False, repo_url, "", noop, direct=True, post_copy=True)
    assert agent.runtime.containers["web"].state == "exited"
    with pytest.raises(FailedPrecondition, match="memory left with a post-copy migration.*only copy"):
        await agent.resume("web")
    assert "resume" not in agent.runtime.calls
    # An agent restarted on the same work folder (killed during the migration's clean-up) refuses too.
    again = AgentService("host-a", agent.runtime, agent.work_dir, repo_url, PASSWORD)
    with pytest.raises(FailedPrecondition, match="memory left with a post-copy migration"):
        await again.resume("web")
    assert "resume" not in agent.runtime.calls
    # Once it runs again (restored some other way), its next dump counts instead.
    agent.runtime.containers["web"].state = "running"
    await agent.checkpoint("op2", "web", False, repo_url, "", noop)
    await agent.resume("web")
    assert "resume" in agent.runtime.calls


async def test_what_a_killed_agent_left_unreported_is_removed_by_the_next_agent(agent, repo_url, monkeypatch):
    m = await agent.checkpoint("op1", "web", False, repo_url, "", noop)
    agent.runtime.containers.pop("web")
    outcome = await agent.restore("op2", m.id, repo_url, "", noop)
    journal = Restoring(os.path.join(agent.work_dir, "restoring"))
    assert outcome.container.state == "running" and journal.unfinished() == []   # a restore, not a migration
    # What a destination agent killed between its runtime's restore and its report leaves (the
    # placement of begin and end in a migration's restore is exercised by the e2e tests).
    journal.begin("web-id", "web")
    agent.runtime.containers["web"] = ContainerInfo("web-id", "web", "localhost/x:1", IMAGE_ID, "running")
    journal.begin("gone-id", "gone")                          # its runtime never made it
    journal.begin("old-id", "db")                             # the name is another container's now
    agent.runtime.containers["db"] = ContainerInfo("new-id", "db", "localhost/x:1", IMAGE_ID, "running")
    await AgentService("host-a", agent.runtime, agent.work_dir, repo_url, PASSWORD).clean_up_after_a_killed_agent()
    assert "web" not in agent.runtime.containers and agent.runtime.containers["db"].id == "new-id"
    assert journal.unfinished() == []
    # A runtime that fails keeps the entry for the next start; the agent starts all the same.
    journal.begin("web-id", "web")
    agent.runtime.containers["web"] = ContainerInfo("web-id", "web", "localhost/x:1", IMAGE_ID, "running")

    async def broken(name, force=False):
        raise RuntimeFailure("podman rm failed")
    monkeypatch.setattr(agent.runtime, "remove", broken)
    await agent.clean_up_after_a_killed_agent()
    assert journal.unfinished() == [Unfinished("web-id", "web")]


def test_the_restore_journal_drops_what_it_cannot_read_and_an_earlier_boot(tmp_path, monkeypatch):
    journal = Restoring(str(tmp_path))
    monkeypatch.setattr(restoring, "boot_id", lambda: "earlier")
    journal.begin("b" * 64, "rebooted")   # a reboot since: nothing runs, and its end may be lost
    monkeypatch.undo()
    journal.begin("a" * 64, "web")
    (tmp_path / "junk").write_text("{not json")
    (tmp_path / "half.tmp").write_text("")
    assert journal.unfinished() == [Unfinished("a" * 64, "web")]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(journal._path("a" * 64))]
    journal.end("a" * 64)
    journal.end("a" * 64)   # twice is fine
    assert journal.unfinished() == []


async def test_preflight_of_a_direct_migration_readies_memory_for_its_pages(agent, tmp_path):
    agent.runtime.landing = str(tmp_path / "landing")
    os.makedirs(agent.runtime.landing)
    await agent.check_migration(b"", 40 << 20)   # another mode: no pool
    assert agent.pools.take() == ""
    await agent.check_migration(b"", 40 << 20, pool_pages=True)
    made = agent.pools.take()
    assert os.path.dirname(os.path.dirname(made)) == agent.runtime.landing and os.path.getsize(made) == 40 << 20


async def test_restore_refuses_taken_name_and_missing_container(agent, repo_url):
    m = await agent.checkpoint("op1", "web", True, repo_url, "", noop)
    with pytest.raises(AlreadyExists, match="--name"):
        await agent.restore("op2", m.id, repo_url, "web", noop)
    with pytest.raises(NotFound, match="on host-a"):
        await agent.checkpoint("op3", "ghost", True, repo_url, "", noop)


async def test_missing_image_is_loaded_from_the_checkpoint(agent, repo_url):
    m = await agent.checkpoint("op1", "web", True, repo_url, "", noop)
    agent.runtime.images.clear()
    await agent.restore("op2", m.id, repo_url, "copy", noop)
    assert "image_load" in agent.runtime.calls


async def test_corruption_stops_restore_before_the_runtime(agent, repo_url):
    m = await agent.checkpoint("op1", "web", True, repo_url, "", noop)
    repo = Repository.open(repo_url, PASSWORD)
    for info in list(repo.backend.list("packs/")):
        data = bytearray(repo.backend.load(info.key))
        data[10] ^= 1
        repo.backend.save(info.key, bytes(data))
    with pytest.raises(IntegrityError):
        await agent.restore("op2", m.id, repo_url, "copy", noop)
    assert "restore" not in agent.runtime.calls


async def test_stopped_container_is_refused(agent, repo_url):
    agent.runtime.containers["web"].state = "exited"
    with pytest.raises(FailedPrecondition, match="not running"):
        await agent.checkpoint("op1", "web", True, repo_url, "", noop)


async def test_only_the_agents_own_repository_is_used(agent, repo_url, tmp_path):
    other = Repository.init(f"file://{tmp_path}/attacker", PASSWORD).url
    with pytest.raises(PermissionDenied, match="serves repository"):
        await agent.checkpoint("op1", "web", True, other, "", noop)
    with pytest.raises(PermissionDenied):
        await agent.restore("op2", "0123456789abcdef", other, "x", noop)
    m = await agent.checkpoint("op3", "web", True, "", "", noop)   # empty means the agent's own
    assert m.id
    fresh = AgentService("host-b", FakeRuntime(), str(tmp_path / "w2"), password=PASSWORD)
    with pytest.raises(FailedPrecondition, match="no repository"):
        await fresh.restore("op4", m.id, repo_url, "x", noop)
    fresh.learn_repository(repo_url)
    assert fresh.repository == repo_url


async def test_migration_preflight_checks_cpu_with_criu_and_space(agent):
    """Real `criu cpuinfo dump/check` (CRIU is part of the stack every test machine has)."""
    import shutil

    from tests.conftest import require
    require(shutil.which("criu") is not None, "criu is not installed: run 'make provision'")
    cpuinfo, memory = await agent.describe_for_migration("web")
    assert len(cpuinfo) > 16 and memory == 0          # the fake runtime cannot tell its memory
    await agent.check_migration(cpuinfo, 1 << 20)      # the same CPU takes it
    with pytest.raises(FailedPrecondition, match="CPU"):
        await agent.check_migration(b"\x00" * 40, 0)   # a damaged or foreign CPU description
    with pytest.raises(FailedPrecondition, match="bytes free"):
        await agent.check_migration(cpuinfo, 1 << 60)
