"""``ephemeral``: memory-backed scratch space, tmpfs (default) or hugetlbfs (fstype ``hugetlbfs``,
with e.g. ``pagesize=2M`` in options)."""

from __future__ import annotations

from agent.errors import InvalidArgument
from agent.storage.base import MountDriver

FSTYPES = ("tmpfs", "hugetlbfs")


class Ephemeral(MountDriver):
    name = "ephemeral"
    default_fstype = "tmpfs"

    def check(self, ctx, storage, what: str) -> None:
        if self.fstype(storage) not in FSTYPES:
            raise InvalidArgument(f"{what}.fstype: {storage.fstype!r} is not one of {', '.join(FSTYPES)}")

    async def source(self, ctx, storage, what: str) -> str:
        return storage.source or self.fstype(storage)
