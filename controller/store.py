"""The controller's state in SQLite: hosts, jobs (with phases and timings) and a checkpoint catalog.

The catalog is a cache of the repository's manifests: it is rebuilt from the repository at start-up,
so losing this database loses no checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from sqlalchemy import Boolean, Float, Integer, String, Text, create_engine, delete, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column


class Base(DeclarativeBase):
    pass


class HostRow(Base):
    __tablename__ = "hosts"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    address: Mapped[str] = mapped_column(String(256))
    last_seen: Mapped[float] = mapped_column(Float)
    info: Mapped[str] = mapped_column(Text, default="{}")


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(32))
    phase: Mapped[str] = mapped_column(String(32), default="")
    params: Mapped[str] = mapped_column(Text, default="{}")
    result: Mapped[str] = mapped_column(Text, default="{}")
    timings: Mapped[str] = mapped_column(Text, default="{}")
    error: Mapped[str] = mapped_column(Text, default="")
    downtime: Mapped[float] = mapped_column(Float, default=0.0)
    created: Mapped[float] = mapped_column(Float)
    updated: Mapped[float] = mapped_column(Float)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    created: Mapped[str] = mapped_column(String(40), index=True)
    host: Mapped[str] = mapped_column(String(128))
    container_name: Mapped[str] = mapped_column(String(128), index=True)
    container_id: Mapped[str] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(String(512))
    image_id: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    criu_version: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    image_size: Mapped[int] = mapped_column(Integer)
    leave_running: Mapped[bool] = mapped_column(Boolean)
    timings: Mapped[str] = mapped_column(Text, default="{}")
    tags: Mapped[str] = mapped_column(Text, default="{}")
    schedule: Mapped[str] = mapped_column(String(128), default="", index=True)
    new_bytes: Mapped[int] = mapped_column(Integer, default=0)


class ScheduleRow(Base):
    __tablename__ = "schedules"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    spec: Mapped[str] = mapped_column(Text)          # the Schedule message as JSON
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    last_run: Mapped[float] = mapped_column(Float, default=0.0)
    next_run: Mapped[float] = mapped_column(Float, default=0.0)
    last_result: Mapped[str] = mapped_column(Text, default="")


class RevocationRow(Base):
    __tablename__ = "revocations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal: Mapped[str] = mapped_column(String(128), default="")
    serial: Mapped[str] = mapped_column(String(64), default="")     # hex
    before: Mapped[str] = mapped_column(String(40), default="")
    reason: Mapped[str] = mapped_column(String(256), default="")


class AuditRow(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[float] = mapped_column(Float, index=True)
    principal: Mapped[str] = mapped_column(String(128), index=True)
    role: Mapped[str] = mapped_column(String(16), default="")
    method: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(Text, default="{}")
    code: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    job_id: Mapped[str] = mapped_column(String(64), default="")


class Store:
    def __init__(self, path: str):
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{path}")

        @event.listens_for(self.engine, "connect")
        def _pragmas(conn, _record):  # durable and concurrent enough for one controller
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")

        Base.metadata.create_all(self.engine)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # ---------------------------------------------------------------- hosts

    def upsert_host(self, name: str, address: str, info: dict[str, Any]) -> None:
        with self.session() as s, s.begin():
            row = s.get(HostRow, name) or HostRow(name=name)
            row.address, row.last_seen, row.info = address, time.time(), json.dumps(info)
            s.add(row)

    def touch_host(self, name: str) -> bool:
        with self.session() as s, s.begin():
            row = s.get(HostRow, name)
            if row is None:
                return False
            row.last_seen = time.time()
            return True

    def host(self, name: str) -> HostRow | None:
        with self.session() as s:
            return s.get(HostRow, name)

    def hosts(self) -> list[HostRow]:
        with self.session() as s:
            return list(s.scalars(select(HostRow).order_by(HostRow.name)))

    # ---------------------------------------------------------------- jobs

    def create_job(self, job_id: str, kind: str, params: dict[str, Any]) -> JobRow:
        now = time.time()
        row = JobRow(id=job_id, kind=kind, state="running", phase="", params=json.dumps(params),
                     result="{}", timings="{}", error="", downtime=0.0, created=now, updated=now)
        with self.session() as s, s.begin():
            s.add(row)
        return row

    def save_job(self, row: JobRow) -> None:
        row.updated = time.time()
        with self.session() as s, s.begin():
            s.merge(row)

    def job(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def jobs(self, limit: int = 50) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).order_by(JobRow.created.desc()).limit(limit)))

    def unfinished_jobs(self) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.state == "running")))

    def uncleaned_migrations(self) -> list[JobRow]:
        """Committed migrations whose source clean-up never ran (the controller stopped first)."""
        with self.session() as s:
            rows = s.scalars(select(JobRow).where(JobRow.kind == "migrate", JobRow.state == "succeeded",
                                                  JobRow.phase.in_(("commit", "cleanup"))))
            return [r for r in rows if "cleanup" not in json.loads(r.result or "{}")]

    # ---------------------------------------------------------------- checkpoint catalog

    def record_checkpoint(self, row: CheckpointRow) -> None:
        with self.session() as s, s.begin():
            s.merge(row)

    def checkpoints(self, container: str = "", host: str = "", schedule: str = "") -> list[CheckpointRow]:
        q = select(CheckpointRow).order_by(CheckpointRow.created)
        if container:
            q = q.where(CheckpointRow.container_name == container)
        if host:
            q = q.where(CheckpointRow.host == host)
        if schedule:
            q = q.where(CheckpointRow.schedule == schedule)
        with self.session() as s:
            return list(s.scalars(q))

    def forget_checkpoint(self, ident: str) -> None:
        with self.session() as s, s.begin():
            row = s.get(CheckpointRow, ident)
            if row is not None:
                s.delete(row)

    # ---------------------------------------------------------------- schedules

    def save_schedule(self, row: ScheduleRow) -> None:
        with self.session() as s, s.begin():
            s.merge(row)

    def schedule(self, name: str) -> ScheduleRow | None:
        with self.session() as s:
            return s.get(ScheduleRow, name)

    def schedules(self) -> list[ScheduleRow]:
        with self.session() as s:
            return list(s.scalars(select(ScheduleRow).order_by(ScheduleRow.name)))

    def delete_schedule(self, name: str) -> bool:
        with self.session() as s, s.begin():
            row = s.get(ScheduleRow, name)
            if row is None:
                return False
            s.delete(row)
            return True

    def checkpoint_ids(self) -> set[str]:
        with self.session() as s:
            return set(s.scalars(select(CheckpointRow.id)))

    # ---------------------------------------------------------------- security

    def add_revocation(self, row: RevocationRow) -> None:
        with self.session() as s, s.begin():
            s.add(row)

    def revocations(self) -> list[RevocationRow]:
        with self.session() as s:
            return list(s.scalars(select(RevocationRow).order_by(RevocationRow.id)))

    def forget_host(self, name: str) -> None:
        with self.session() as s, s.begin():
            row = s.get(HostRow, name)
            if row is not None:
                s.delete(row)

    def add_audit(self, row: AuditRow, keep: int = 200_000) -> None:
        with self.session() as s, s.begin():
            s.add(row)
            s.flush()
            if row.id % 1000 == 0:   # cap the log's size, oldest first, now and then
                s.execute(delete(AuditRow).where(AuditRow.id <= row.id - keep))

    def audit(self, since: float = 0.0, principal: str = "", limit: int = 100) -> list[AuditRow]:
        q = select(AuditRow).where(AuditRow.time >= since).order_by(AuditRow.id.desc()).limit(limit)
        if principal:
            q = q.where(AuditRow.principal == principal)
        with self.session() as s:
            return list(s.scalars(q))
