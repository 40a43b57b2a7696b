"""Schedule definitions and the scheduler's timing rules, with a fake clock (real runs: test_e2e)."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from stasis.controller.schedules import next_after
from stasis.controller.service import ControllerService
from stasis.controller.store import Store
from stasis.errors import AlreadyExists, InvalidArgument, NotFound
from stasis.proto.v1 import stasis_pb2 as pb
from stasis.storage.repository import Repository


@pytest.fixture
def service(tmp_path):
    repo = Repository.init(f"memory://{tmp_path.name}", None, encrypt=False)
    svc = ControllerService(Store(str(tmp_path / "c.db")), repo)
    runs: list[str] = []

    async def fake_run(spec):
        runs.append(spec.name)
    svc.schedules.run = fake_run
    svc.runs = runs
    return svc


def spec(**kw) -> pb.Schedule:
    base = {"name": "nightly", "selector": "host-a/web", "every_seconds": 60}
    base.update(kw)
    return pb.Schedule(**base)


async def test_a_missed_run_runs_once_not_once_per_missed_slot(service):
    service.schedules.create(spec())
    row = service.store.schedule("nightly")
    now = time.time()
    row.next_run = now - 600          # the controller was down for ten slots
    service.store.save_schedule(row)
    assert service.schedules.tick_once(now) == ["nightly"]
    assert service.schedules.tick_once(now + 1) == []
    assert service.store.schedule("nightly").next_run == pytest.approx(now + 60)
    assert service.schedules.tick_once(now + 61) == ["nightly"]


async def test_paused_schedules_do_not_run_and_resume_does_not_replay(service):
    service.schedules.create(spec(paused=True))
    now = time.time()
    assert service.schedules.tick_once(now + 3600) == []
    resumed = service.schedules.pause("nightly", False)
    assert resumed.next_run and service.store.schedule("nightly").next_run >= now + 59


async def test_schedules_survive_a_restart(tmp_path, service):
    service.schedules.create(spec(retention=pb.RetentionPolicy(keep_last=3), pre_hook="sync"))
    again = ControllerService(Store(str(tmp_path / "c.db")), service.repository)
    got = again.schedules.get("nightly")
    assert got.retention.keep_last == 3 and got.pre_hook == "sync" and got.selector == "host-a/web"


def test_cron_and_interval_next_runs():
    t = datetime(2026, 11, 29, 10, 0, tzinfo=timezone.utc).timestamp()
    assert next_after(pb.Schedule(cron="0 3 * * *"), t) == datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc).timestamp()
    assert next_after(pb.Schedule(every_seconds=900), t) == t + 900


@pytest.mark.parametrize("bad,problem", [
    ({"name": "Bad Name"}, "invalid"),
    ({"selector": "", "labels": {}}, "either --selector"),
    ({"labels": {"app": "db"}}, "not both"),
    ({"every_seconds": 0}, "--every"),
    ({"cron": "0 3 * * *"}, "either --every"),
    ({"every_seconds": 0, "cron": "61 * * * *"}, "cron expression"),
    ({"hook_on_error": "ignore"}, "fail or continue"),
])
async def test_invalid_schedules_are_refused_with_the_reason(service, bad, problem):
    with pytest.raises(InvalidArgument, match=problem):
        service.schedules.create(spec(**bad))


async def test_names_are_unique_and_unknown_names_are_errors(service):
    service.schedules.create(spec())
    with pytest.raises(AlreadyExists):
        service.schedules.create(spec())
    with pytest.raises(NotFound, match="stasis schedule list"):
        service.schedules.get("nope")
    service.schedules.delete("nightly")
    with pytest.raises(NotFound):
        service.schedules.delete("nightly")
