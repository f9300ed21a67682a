"""``virtio-fs``: a virtiofs share named by its tag (the storage source)."""

from __future__ import annotations

from agent.storage.base import MountDriver


class VirtioFs(MountDriver):
    name = "virtio-fs"
    default_fstype = "virtiofs"

    def fstype(self, storage) -> str:
        return "virtiofs"
