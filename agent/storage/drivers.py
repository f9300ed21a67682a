"""Every storage driver, by the driver name a Storage message gives."""

from __future__ import annotations

from agent.storage.bind import Bind
from agent.storage.blk import Blk
from agent.storage.ephemeral import Ephemeral
from agent.storage.local import Local
from agent.storage.mmioblk import MmioBlk
from agent.storage.nvdimm import Nvdimm
from agent.storage.overlayfs import Overlay
from agent.storage.scsi import Scsi
from agent.storage.virtiofs import VirtioFs


def _table(*drivers) -> dict:
    table = {}
    for drv in drivers:
        if drv.name in table:
            raise RuntimeError(f"storage driver {drv.name} listed twice")
        table[drv.name] = drv
    return table


# No 9p: the guest's cloud kernel has no 9p at all, so it is not offered.
DRIVERS = _table(VirtioFs(), Blk(), MmioBlk(), Scsi(), Nvdimm(), Ephemeral(), Local(), Overlay(), Bind())
