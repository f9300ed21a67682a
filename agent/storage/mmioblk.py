"""``mmioblk``: virtio-mmio block devices, named ``/dev/vdX`` by the host."""

from __future__ import annotations

from agent.storage.base import BlockDriver


class MmioBlk(BlockDriver):
    name = "mmioblk"
    device_type = "mmioblk"
