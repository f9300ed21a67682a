"""``nvdimm``: a persistent-memory device ``/dev/pmemN``, mounted with ``dax``. The kernel finds
QEMU's NVDIMM through ACPI NFIT (agent.devices loads nfit and nd_pmem first)."""

from __future__ import annotations

from agent.storage.base import BlockDriver, add_data


class Nvdimm(BlockDriver):
    name = "nvdimm"
    device_type = "nvdimm"

    def options(self, storage):
        return add_data(super().options(storage), "dax")
