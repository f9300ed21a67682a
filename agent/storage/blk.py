"""``blk``: virtio-blk; the source is a PCI path (``02/00``) or a ``/dev/NAME`` node.

A PCI path makes the agent rescan the bus and wait for a block device below that PCI function.
"""

from __future__ import annotations

from agent.storage.base import BlockDriver


class Blk(BlockDriver):
    name = "blk"
    device_type = "blk"
