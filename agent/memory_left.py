"""Containers whose memory left this host with a post-copy migration.

Once a post-copy dump has served every page, the images it left here hold no memory: a "resume"
from them would be a CRIU restore without pages. The agent refuses it, and the mark outlives the
agent (a restart in the middle of a migration's clean-up must refuse as well): one file per
container id in the agent's work folder, named by a hash of the id, holding the id. By id, so that a
new container of the same name is never taken for the old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os


class MemoryLeft:
    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, mode=0o700, exist_ok=True)

    def _path(self, container_id: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(container_id.encode()).hexdigest())

    def add(self, container_id: str) -> None:
        tmp = self._path(container_id) + ".tmp"
        with open(tmp, "w") as f:
            f.write(container_id)
            f.flush()
            os.fsync(f.fileno())   # the mark must survive the host's crash as well as the agent's
        os.replace(tmp, self._path(container_id))

    def discard(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(container_id))

    def __contains__(self, container_id: str) -> bool:
        try:
            with open(self._path(container_id)) as f:
                return f.read() == container_id
        except FileNotFoundError:
            return False
