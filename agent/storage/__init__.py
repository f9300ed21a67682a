"""Storages: drivers keyed by driver name, and refcounted mounts per mount point.

A Storage names a driver (``virtio-fs``, ``blk``, ``mmioblk``, ``scsi``, ``nvdimm``, ``ephemeral``,
``local``, ``overlayfs``, and our own ``bind``; no ``9p``: the guest's cloud kernel has no 9p at
all, so it is not offered; the table is agent.storage.drivers), a source, options and a
mount point that must lie under /run/kata-containers/. Every storage of a request is checked
before anything is mounted. Mounts are shared: the same mount point requested again (a second
container) takes a reference; the mount goes away with the last reference.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.errors import InvalidArgument
from agent.storage import paths
from agent.storage.drivers import DRIVERS
from agent.storage.fsgroup import apply_fs_group
from agent.storage.syscalls import MNT_DETACH, MS_RDONLY, mounts_under, parse_options, umount

log = logging.getLogger(__name__)

@dataclass
class MountContext:
    """What a driver may use: device waiting and where the agent keeps its state."""

    uevents: Any
    hotplug_timeout: float
    kata_root: str
    run_dir: str


class Driver(Protocol):
    name: str
    mounts: bool  # False for drivers that only make a directory (local)

    def check(self, ctx: MountContext, storage, what: str) -> None: ...

    async def mount(self, ctx: MountContext, storage, target: str, what: str) -> list[str] | None:
        """Mount onto ``target``; returns directories it created elsewhere (removed at release)."""


@dataclass
class Mounted:
    key: str
    driver: str
    refs: int = 1
    created: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    spec: tuple = ()


@dataclass(frozen=True)
class Checked:
    """A storage of a request that ``StorageManager.check`` passed, with its mount point."""

    storage: Any
    what: str  # the request's field, e.g. storages[0]
    parts: tuple[str, ...]  # the mount point's components below kata_root
    target: str


def storage_spec(storage) -> tuple:
    return (storage.driver, storage.source, storage.fstype, tuple(storage.options),
            tuple(storage.driver_options))


class StorageManager:
    """The agent's mounts made for storages, by mount point, with reference counts."""

    def __init__(self, ctx: MountContext) -> None:
        self.ctx = ctx
        self.mounts: dict[str, Mounted] = {}
        self._lock = asyncio.Lock()  # one mount at a time: two users of a mount point share it

    def _locate(self, storage, what: str) -> tuple[list[str], str]:
        """The mount point's components below kata_root, and the path they make."""
        mapped = paths.map_run_dir(storage.mount_point, self.ctx.run_dir)
        parts = paths.lexical_under(mapped, self.ctx.kata_root, f"{what}.mount_point")
        return parts, os.path.join(self.ctx.kata_root, *parts)

    def target_of(self, storage, what: str) -> str:
        return self._locate(storage, what)[1]

    def check(self, storages, field_name: str) -> list[Checked]:
        """Validate every storage before any is mounted; returns them with their mount points,
        for ``add_all``.

        Each mount point is resolved once, lexically: no ``..``, no ``.`` and no empty
        components remain, so two spellings of one path compare equal; a symlink on the way is
        refused when the mount point is walked (``paths.walk_dirs``)."""
        checked: list[Checked] = []
        seen: set[str] = set()
        for i, s in enumerate(storages):
            what = f"{field_name}[{i}]"
            drv = DRIVERS.get(s.driver)
            if drv is None:
                raise InvalidArgument(f"{what}.driver: unknown storage driver {s.driver!r} "
                                      f"(known: {', '.join(sorted(DRIVERS))})")
            parts, target = self._locate(s, what)
            if target in seen:
                raise InvalidArgument(f"{what}.mount_point: {s.mount_point!r} appears twice")
            drv.check(self.ctx, s, what)
            seen.add(target)
            checked.append(Checked(s, what, tuple(parts), target))
        return checked

    async def add(self, checked: Checked) -> str:
        """Mount a checked storage (or take another reference to it); returns the mount point key."""
        async with self._lock:
            return await self._add(checked)

    async def _add(self, checked: Checked) -> str:
        storage, what, target = checked.storage, checked.what, checked.target
        have = self.mounts.get(target)
        if have is not None:
            if have.spec != storage_spec(storage):
                log.warning("mount point reused with a different storage",
                            extra={"fields": {"mount_point": target, "storage": what}})
            have.refs += 1
            return target
        drv = DRIVERS[storage.driver]
        walk = paths.walk_dirs(self.ctx.kata_root, list(checked.parts), mode=0o750)
        try:
            # the walk refused symlinks on the way; nothing else in the agent swaps directories
            # under /run/kata-containers for symlinks, so the path is still the one checked
            extra = await drv.mount(self.ctx, storage, target, what) or []
        except BaseException:
            walk.close()
            paths.remove_dirs(walk.created)
            raise
        walk.close()
        entry = Mounted(target, drv.name, created=walk.created, extra=extra,
                        spec=storage_spec(storage))
        self.mounts[target] = entry
        try:
            self._apply_fs_group(storage, target)
        except BaseException:
            self._take_down(entry)
            raise
        log.info("storage mounted", extra={"fields": {"mount_point": target, "driver": drv.name}})
        return target

    def _apply_fs_group(self, storage, target: str) -> None:
        if not storage.HasField("fs_group"):
            return
        if parse_options(storage.options).flags & MS_RDONLY:  # nothing to change
            return
        apply_fs_group(target, storage.fs_group.group_id, storage.fs_group.group_change_policy)

    async def add_all(self, checked: list[Checked], undo) -> list[str]:
        """Mount each storage ``check`` returned, registering its release on ``undo``."""
        keys = []
        for c in checked:
            key = await self.add(c)
            undo.push(f"storage {key}", lambda key=key: self.release(key))
            keys.append(key)
        return keys

    def release(self, key: str) -> None:
        """Drop one reference; the last one unmounts and removes what was created."""
        entry = self.mounts.get(key)
        if entry is None:
            return
        entry.refs -= 1
        if entry.refs <= 0:
            self._take_down(entry)

    def _take_down(self, entry: Mounted) -> None:
        if DRIVERS[entry.driver].mounts:
            umount(entry.key, MNT_DETACH)
        elif entry.key in entry.created:
            _remove_tree(entry.key)
        self.mounts.pop(entry.key, None)
        for path in entry.extra:
            _remove_tree(path)
        paths.remove_dirs(entry.created)
        log.info("storage released", extra={"fields": {"mount_point": entry.key}})

    def sweep_leaks(self) -> list[str]:
        """After every user released its references: whatever is still mounted leaked (an undo
        that did not run); log each and take it down. Returns the leaked mount points."""
        leaked = sorted(self.mounts, reverse=True)
        for key in leaked:
            entry = self.mounts[key]
            log.error("storage leaked: still referenced after its users released it",
                      extra={"fields": {"mount_point": key, "refs": entry.refs}})
            try:
                self._take_down(entry)
            except OSError:
                log.exception("cannot release storage", extra={"fields": {"mount_point": key}})
                self.mounts.pop(key, None)
        return leaked

def _remove_tree(path: str) -> None:
    """Remove a directory tree the agent made, never descending into a mount below it."""
    if mounts_under(path):
        log.error("not removing %s: something is mounted below it", path)
        return
    shutil.rmtree(path, ignore_errors=True)
