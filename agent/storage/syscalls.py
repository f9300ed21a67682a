"""mount(2)/umount2(2) through ctypes, mount option parsing, and /proc/self/mountinfo."""

from __future__ import annotations

import os
from dataclasses import dataclass

from agent import linux
from agent.linux import (MNT_DETACH, MS_BIND, MS_DIRSYNC, MS_MANDLOCK, MS_NOATIME,  # noqa: F401
                         MS_NODEV, MS_NODIRATIME, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_RDONLY,
                         MS_REC, MS_RELATIME, MS_REMOUNT, MS_SHARED, MS_SILENT, MS_SLAVE,
                         MS_STRICTATIME, MS_SYNCHRONOUS, MS_UNBINDABLE)

MS_NOSYMFOLLOW = 0x100
MS_LAZYTIME = 1 << 25

# option -> (flags to set, flags to clear)
_FLAGS: dict[str, tuple[int, int]] = {
    "defaults": (0, 0),
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0), "mand": (MS_MANDLOCK, 0), "nomand": (0, MS_MANDLOCK),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "lazytime": (MS_LAZYTIME, 0),
    "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "bind": (MS_BIND, 0), "rbind": (MS_BIND | MS_REC, 0),
    "remount": (MS_REMOUNT, 0), "silent": (MS_SILENT, 0),
    "private": (MS_PRIVATE, 0), "rprivate": (MS_PRIVATE | MS_REC, 0),
    "slave": (MS_SLAVE, 0), "rslave": (MS_SLAVE | MS_REC, 0),
    "shared": (MS_SHARED, 0), "rshared": (MS_SHARED | MS_REC, 0),
    "unbindable": (MS_UNBINDABLE, 0), "runbindable": (MS_UNBINDABLE | MS_REC, 0),
}


@dataclass(frozen=True)
class MountOptions:
    flags: int = 0
    data: str = ""

    @property
    def propagation(self) -> int:
        return self.flags & (MS_PRIVATE | MS_SLAVE | MS_SHARED | MS_UNBINDABLE)


def parse_options(options: list[str] | tuple[str, ...]) -> MountOptions:
    """Split ``["ro", "nodev", "size=10m"]`` into mount flags and the filesystem data string."""
    flags = 0
    data: list[str] = []
    for opt in options:
        for part in opt.split(","):
            if not part:
                continue
            if part in _FLAGS:
                on, off = _FLAGS[part]
                flags = (flags | on) & ~off
            else:
                data.append(part)
    return MountOptions(flags, ",".join(data))


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


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    out = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            out.append(MountEntry(int(a[0]), int(a[1]), _unescape(a[3]), _unescape(a[4]),
                                  b[0], _unescape(b[1]) if len(b) > 1 else ""))
    return out


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix``, deepest (latest) first."""
    prefix = prefix.rstrip("/")
    found = [m.mount_point for m in mountinfo()
             if m.mount_point == prefix or m.mount_point.startswith(prefix + "/")]
    return list(reversed(found))


def is_mount_point(path: str) -> bool:
    return any(m.mount_point == path for m in mountinfo())
