"""Shared pieces of the storage drivers."""

from __future__ import annotations

import os

from agent import devices
from agent.errors import InvalidArgument
from agent.storage.syscalls import MountOptions, mount, parse_options


class MountDriver:
    """A driver that mounts ``source`` with ``fstype`` and the storage's options."""

    name = ""
    mounts = True
    default_fstype = ""

    def check(self, ctx, storage, what: str) -> None:
        if not storage.source:
            raise InvalidArgument(f"{what}.source: empty")

    def options(self, storage) -> MountOptions:
        return parse_options(list(storage.options))

    def fstype(self, storage) -> str:
        return storage.fstype or self.default_fstype

    async def source(self, ctx, storage, what: str) -> str:
        return storage.source

    async def mount(self, ctx, storage, target: str, what: str) -> None:
        opts = self.options(storage)
        src = await self.source(ctx, storage, what)
        mount(src, target, self.fstype(storage), opts.flags, opts.data)


class BlockDriver(MountDriver):
    """A filesystem on a block device the host plugged in; wait for it, then mount it."""

    device_type = ""

    def check(self, ctx, storage, what: str) -> None:
        super().check(ctx, storage, what)
        if not storage.fstype:
            raise InvalidArgument(f"{what}.fstype: empty (the filesystem on {storage.source!r})")
        if "/" in storage.fstype or storage.fstype.startswith("."):
            raise InvalidArgument(f"{what}.fstype: {storage.fstype!r} is not a filesystem type")

    async def source(self, ctx, storage, what: str) -> str:
        node = await devices.wait_device(ctx.uevents, self.device_type, storage.source,
                                         ctx.hotplug_timeout, f"{what}.source ({storage.source})")
        path = node.path
        if not os.path.exists(path):
            raise InvalidArgument(f"{what}.source: {storage.source} appeared as {node.name} "
                                  f"but {path} does not exist")
        return path


def add_data(opts: MountOptions, *items: str) -> MountOptions:
    """``opts`` with filesystem options appended unless a key is already given."""
    have = {d.split("=", 1)[0] for d in opts.data.split(",") if d}
    extra = [i for i in items if i.split("=", 1)[0] not in have]
    data = ",".join(x for x in (opts.data, *extra) if x)
    return MountOptions(opts.flags, data)
