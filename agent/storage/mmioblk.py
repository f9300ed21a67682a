"""``mmioblk``: virtio-mmio block devices, named ``/dev/vdX`` by the host."""

from __future__ import annotations

from agent.storage import driver
from agent.storage.base import BlockDriver


@driver
class MmioBlk(BlockDriver):
    name = "mmioblk"
    device_type = "mmioblk"
