"""``nvdimm``: a persistent-memory device ``/dev/pmemN``, mounted with ``dax``.

The guest kernel finds QEMU's NVDIMM through ACPI NFIT; in the cloud kernel those drivers are
modules (acpi_nfit, nd_pmem), which nothing autoloads without udev: they are loaded here, on the
first nvdimm storage (best effort: built in or absent is no error; the wait names a missing device).
"""

from __future__ import annotations

from agent.runtime import command
from agent.storage.base import BlockDriver, add_data

KERNEL_MODULES = ("acpi_nfit", "nd_pmem")


class Nvdimm(BlockDriver):
    name = "nvdimm"
    device_type = "nvdimm"

    def options(self, storage):
        return add_data(super().options(storage), "dax")

    async def source(self, ctx, storage, what: str) -> str:
        await command.run(["modprobe", "-a", "-q", *KERNEL_MODULES], timeout=30)
        return await super().source(ctx, storage, what)
