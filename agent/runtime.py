"""The Runtime seam: everything the agent asks of a container engine.

One implementation per engine (podman today). The rest of the agent never shells out to an
engine itself, so adding docker means adding one class.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from stasis.errors import FailedPrecondition


@dataclass
class ContainerInfo:
    id: str
    name: str
    image: str
    image_id: str
    state: str
    created: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class DumpStats:
    """What a runtime checkpoint reports: wall time of the whole dump and CRIU's own figures."""

    seconds: float
    criu: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)   # engine-specific parts of `seconds`

    @property
    def frozen_seconds(self) -> float | None:
        return self.criu["frozen_time"] / 1e6 if "frozen_time" in self.criu else None


@dataclass
class RestoreStats:
    seconds: float
    container_id: str
    criu: dict[str, int] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)


class Runtime(abc.ABC):
    name: str
    #: the checkpoint archive carries the container's image (docker: a commit), so the agent
    #: neither ships nor checks the image separately
    archive_includes_image: bool = False

    @abc.abstractmethod
    async def version(self) -> str: ...

    @abc.abstractmethod
    async def list(self, all: bool = False) -> list[ContainerInfo]: ...

    @abc.abstractmethod
    async def inspect(self, name: str) -> ContainerInfo:
        """Raises NotFound for an unknown container."""

    @abc.abstractmethod
    async def checkpoint(self, name: str, archive: str, leave_running: bool,
                         ignore_volumes: bool = False) -> DumpStats:
        """Dump the container with CRIU into a self-contained archive (memory, files, config)."""

    @abc.abstractmethod
    async def restore(self, archive: str, name: str, renamed: bool = True,
                      ignore_volumes: bool = False, pages_port: int = 0, container_id: str = "",
                      pages_dir: str = "", restored: Callable[[], None] = lambda: None,
                      made: Callable[[str], None] = lambda _id: None) -> RestoreStats:
        """`renamed`: `name` differs from the checkpointed container's (a copy, not a move).
        `ignore_volumes`: the archive left named volumes out; use the ones this host has.
        `pages_port`: post-copy; memory comes lazily from 127.0.0.1:`pages_port` (the relay to the
        source) for the container `container_id`. `pages_dir`: CRIU's pages-*.img are in this folder,
        not in the archive (a folder in `pages_landing()`; same name and id). `restored()`: may be
        called once CRIU's restore is done and the processes run, before the engine's own bookkeeping
        ends (a migration's downtime ends there); the caller treats a return as that moment too.
        `made(id)`: called with the container's id before the engine creates it, or at once after,
        when the id is known (a same-id restore, or an engine that creates then starts)."""

    def sweep(self) -> None:
        """At the agent's start: remove what an agent killed mid-migration left behind."""
        return None

    async def warm_up(self) -> None:
        """At the agent's start, after sweep(): one-time probes of the engine, which would otherwise
        run inside the first migration's downtime."""
        return None

    async def pages_landing(self) -> str:
        """A folder where restore() can take CRIU's pages from (pages_dir: a folder made in it), on
        the same mount as the engine's images so that they are linked, not copied; "" if it cannot."""
        return ""

    async def checkpoint_for_transfer(self, name: str, archive: str, scratch: str, ignore_volumes: bool = False,
                                      freezing: Callable[[], None] = lambda: None,
                                      archived: Callable[[], Awaitable[None]] | None = None) -> DumpStats:
        """A migration's stopping dump into `archive`, which a peer reads as it grows; returns once the
        archive is complete and the engine is done. It may leave members' data in their own files
        (spliced_archive), which must stay until the peer has read them or the container is resumed
        or removed. `scratch`: a folder for the engine's own leftovers. `freezing()`: called once, when
        the engine starts the dump that freezes the container (downtime counts from there).
        `archived()`: awaited if the archive is complete before the engine has finished its own work
        (the peer may restore meanwhile); the dump stands from then on, whatever the engine's own
        clean-up does. By default, the engine's own export."""
        freezing()
        return await self.checkpoint(name, archive, False, ignore_volumes)

    #: post-copy: the dump keeps memory in place and serves it lazily; restore runs before it arrives
    supports_post_copy: bool = False

    async def checkpoint_post_copy(self, name: str, archive: str, scratch: str, ignore_volumes: bool, port: int,
                                   images_ready: Callable[[float], Awaitable[None]],
                                   freezing: Callable[[], None] = lambda: None) -> DumpStats:
        """Dump everything but memory into `archive` (calling `freezing()` as for
        checkpoint_for_transfer), call `images_ready(seconds frozen so far)`,
        then serve memory from CRIU's page server on 127.0.0.1:`port` until the peer has it all.
        `scratch`: a folder for the engine's own leftovers."""
        raise FailedPrecondition(f"{self.name} cannot migrate with post-copy; it needs podman")

    async def abort_post_copy(self, container_id: str) -> bool:
        """Stop a post-copy dump before its memory left: the container resumes here."""
        return False

    def post_copy_failure(self, container_id: str) -> str:
        """Why this host's lazy-pages daemon for the container failed ('' if it did not)."""
        return ""

    def post_copy_ended(self, container_id: str) -> None:
        """The destination's copy is over (complete or not): forget its daemon's traces."""
        return None

    @abc.abstractmethod
    async def resume(self, name: str) -> None:
        """Restore a container from the checkpoint its own last dump left on this host."""

    @abc.abstractmethod
    async def remove(self, name: str, force: bool = False) -> None: ...

    @abc.abstractmethod
    async def exec(self, name: str, argv: list[str], timeout: float) -> tuple[int, str]:
        """Run argv inside the container; (exit code, tail of its output)."""

    @abc.abstractmethod
    async def image_exists(self, image_id: str) -> bool: ...

    @abc.abstractmethod
    async def image_save(self, image: str, image_id: str, archive: str) -> None: ...

    async def memory_bytes(self, name: str) -> int:
        """The container's memory use now (0 if the engine cannot tell): a checkpoint's size."""
        return 0

    @abc.abstractmethod
    async def image_load(self, archive: str) -> None: ...
