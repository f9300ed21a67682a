"""``bind``: OUR EXTENSION, not a Kata driver. Bind-mounts an existing guest directory (the source)
at the mount point, recursively; ``ro`` and other per-mount flags apply. Meant for running the
agent outside a VM and for tests."""

from __future__ import annotations

import os

from agent.errors import InvalidArgument
from agent.storage.base import MountDriver
from agent.storage.syscalls import mount_bind


class Bind(MountDriver):
    name = "bind"

    def check(self, ctx, storage, what: str) -> None:
        if not storage.source.startswith("/"):
            raise InvalidArgument(f"{what}.source: {storage.source!r} is not an absolute path")
        if not os.path.isdir(storage.source):
            raise InvalidArgument(f"{what}.source: {storage.source!r} is not a directory")

    async def mount(self, ctx, storage, target: str, what: str) -> None:
        mount_bind(storage.source, target, self.options(storage))
