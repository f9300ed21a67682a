"""``scsi``: virtio-scsi; the source is ``target:lun``. The agent asks every SCSI host to scan for
it, then waits for the block device at ``0:0:target:lun``."""

from __future__ import annotations

from agent.storage.base import BlockDriver


class Scsi(BlockDriver):
    name = "scsi"
    device_type = "scsi"
