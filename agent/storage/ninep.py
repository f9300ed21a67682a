"""``9p``: a virtio-9p share; trans=virtio and version=9p2000.L, msize as given (default 8192)."""

from __future__ import annotations

from agent.storage.base import MountDriver, add_data

DEFAULT_MSIZE = 8192


class NineP(MountDriver):
    name = "9p"

    def fstype(self, storage) -> str:
        return "9p"

    def options(self, storage):
        return add_data(super().options(storage), "trans=virtio", "version=9p2000.L",
                        f"msize={DEFAULT_MSIZE}")
