"""Mounts as storages want them: options as flags plus a data string, bind mounts with their
flags, the mounts below a path. The calls and the parsing are agent.linux's."""

from __future__ import annotations

from dataclasses import dataclass

from agent import linux
from agent.linux import MNT_DETACH, MS_BIND, MS_PROPAGATION, MS_RDONLY, MS_REC, MS_REMOUNT  # noqa: F401
from agent.linux import mountinfo, mounts_under  # noqa: F401


@dataclass(frozen=True)
class MountOptions:
    flags: int = 0  # propagation flags included
    data: str = ""

    @property
    def propagation(self) -> int:
        return self.flags & MS_PROPAGATION


def parse_options(options: list[str] | tuple[str, ...]) -> MountOptions:
    """Split ``["ro", "nodev", "size=10m"]`` into mount flags and the filesystem data string."""
    words = linux.parse_mount_options(options)
    flags = words.flags
    for propagation in words.propagation:
        flags |= propagation
    return MountOptions(flags, ",".join(words.data))


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    linux.mount(source or None, target, fstype or None, flags, data or None)


def umount(target: str, flags: int = 0) -> None:
    linux.umount2(target, flags)


def mount_bind(source: str, target: str, opts: MountOptions = MountOptions(), recursive: bool = True) -> None:
    """A bind mount; read-only and other per-mount flags need a remount, done here."""
    mount(source, target, None, MS_BIND | (MS_REC if recursive else 0))
    extra = opts.flags & ~(MS_BIND | MS_REC | MS_REMOUNT) & ~opts.propagation
    try:
        if extra:
            mount("", target, None, MS_BIND | MS_REMOUNT | extra)
        if opts.propagation:
            mount("", target, None, opts.propagation)
    except OSError:
        umount(target, MNT_DETACH)
        raise
