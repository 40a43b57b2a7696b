"""Restores this agent began and has not reported, kept on disk so a restarted agent can undo them.

An agent killed while its runtime restores a migrated container leaves what the runtime made (a
container that may even run) where the controller cannot reach it: the controller's rollback finds
the agent gone and resumes the source. The next agent removes it before it serves any call, so two
copies do not outlive the dead agent.

An entry is written once the runtime knows the copy's id (podman: the source's, before its import;
docker: a new one, right after it creates the container, before CRIU runs) and removed before the
agent reports the outcome, success or failure (a failed copy the controller's rollback removes). An
entry left behind means nobody was told of the container, so nothing was committed on it. A
post-copy copy leaves the journal once all its memory has arrived: it is then the only copy. Keyed by
container id: a container of the same name made since is never touched.

Not fsynced: the write is on the downtime's path (an fsync waits behind the pages being written back,
0.3 s measured), and what it guards against is the agent's death, which the page cache survives.
After a reboot no copy runs, and an entry's end may have been lost with the page cache: entries
carry the boot they were written in, and one from an earlier boot is dropped, never acted on.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass


BOOT_ID = "/proc/sys/kernel/random/boot_id"


@functools.cache   # it names this boot: read once, not on each restore's downtime path
def boot_id() -> str:
    with open(BOOT_ID) as f:
        return f.read().strip()


@dataclass(frozen=True)
class Unfinished:
    container_id: str
    name: str


class Restoring:
    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)

    def _path(self, container_id: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(container_id.encode()).hexdigest())

    def begin(self, container_id: str, name: str) -> None:
        path = self._path(container_id)
        with open(path + ".tmp", "w") as f:
            json.dump({"id": container_id, "name": name, "boot": boot_id()}, f)
        os.replace(path + ".tmp", path)

    def end(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(container_id))

    def unfinished(self) -> list[Unfinished]:
        """Entries of this boot; the rest (half-written, unreadable, an earlier boot's) are dropped."""
        found, boot = [], boot_id()
        for entry in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, entry)
            try:
                with open(path) as f:
                    doc = json.load(f)
                if not entry.endswith(".tmp") and doc["boot"] == boot:
                    found.append(Unfinished(str(doc["id"]), str(doc["name"])))
                    continue
            except (OSError, ValueError, KeyError, TypeError):
                pass
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return found
