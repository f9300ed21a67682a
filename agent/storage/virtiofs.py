"""``virtio-fs``: a virtiofs share named by its tag (the storage source)."""

from __future__ import annotations

from agent.storage import driver
from agent.storage.base import MountDriver


@driver
class VirtioFs(MountDriver):
    name = "virtio-fs"
    default_fstype = "virtiofs"

    def fstype(self, storage) -> str:
        return "virtiofs"
