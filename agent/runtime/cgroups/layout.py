"""Which hierarchy serves which controller: pure v2, v1, or hybrid (v1 controllers + a cgroup2).

Controllers are named by their v1 ("logical") names throughout the package: cpu, cpuacct, cpuset,
memory, devices, freezer, blkio, pids, hugetlb. A v1 mount serves a controller when it is mounted
there; otherwise the cgroup2 mount serves it when enabled there (blkio is "io" on v2; cpuacct
and freezer are core features of every v2 cgroup; devices is an eBPF program attached to it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from agent import linux

LOGICAL = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "hugetlb")
V2_NAME = {"cpu": "cpu", "cpuset": "cpuset", "memory": "memory", "blkio": "io", "pids": "pids",
           "hugetlb": "hugetlb"}
V2_CORE = ("cpuacct", "freezer", "devices")  # devices: an eBPF program on any v2 cgroup
# Enabled in the parents of every cgroup on a pure v2 host, so that stats have their files.
V2_DEFAULT = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb")


@dataclass(frozen=True)
class Route:
    version: int  # 1 or 2
    root: str  # the hierarchy's mount point (or the test root)

    def v2_controller(self, logical: str) -> str | None:
        """The name to enable in cgroup.subtree_control, or None for core features."""
        return V2_NAME.get(logical) if self.version == 2 else None


@dataclass(frozen=True)
class Layout:
    v1: dict[str, str] = field(default_factory=dict)  # logical controller -> mount point
    v2: str | None = None  # the cgroup2 mount point (or a directory used as the root)
    v2_controllers: frozenset[str] = frozenset()  # available at the v2 root (cgroup.controllers)
    # cgroup2 mounted with favordynmods (Linux 6.0): moving a running process into a v2 cgroup
    # then waits for no RCU grace period (forks and exits pay a little instead).
    v2_dynmods: bool = False
    # Named v1 hierarchies without controllers that a container joins, as runc's fs driver does:
    # name=systemd only. Its cgroup shows in the container's /sys/fs/cgroup/systemd.
    named: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        if self.v1 and self.v2:
            return "hybrid"
        if self.v1:
            return "v1"
        return "v2" if self.v2 else "none"

    def route(self, logical: str) -> Route | None:
        if logical in self.v1:
            return Route(1, self.v1[logical])
        if self.v2 is None:
            return None
        if logical in V2_CORE or V2_NAME.get(logical, "") in self.v2_controllers:
            return Route(2, self.v2)
        return None

    def roots(self) -> list[str]:
        """Every distinct hierarchy a cgroup is created in (co-mounted controllers share one)."""
        seen: list[str] = []
        for logical in LOGICAL:
            mount = self.v1.get(logical)
            if mount and mount not in seen:
                seen.append(mount)
        seen.extend(m for m in self.named if m not in seen)
        if self.v2 and self.v2 not in seen:
            seen.append(self.v2)
        return seen


def hierarchies(mounts: list[linux.MountEntry]) -> tuple[dict[str, str], str | None, bool]:
    """(v1 controller -> mount point, cgroup2 mount point, whether it favors dynamic changes)
    from the mount table."""
    v1: dict[str, str] = {}
    v2: str | None = None
    dynmods = False
    for m in mounts:
        superopts = m.super_options.split(",")
        if m.fstype == "cgroup2" and v2 is None:
            v2, dynmods = m.mount_point, "favordynmods" in superopts
        elif m.fstype == "cgroup":
            for opt in superopts:
                if opt in LOGICAL and opt not in v1:
                    v1[opt] = m.mount_point
    return v1, v2, dynmods


JOINED_NAMED = ("name=systemd",)


def named_hierarchies(mounts: list[linux.MountEntry]) -> tuple[str, ...]:
    """Mount points of the named v1 hierarchies a container joins (JOINED_NAMED)."""
    out: list[str] = []
    for m in mounts:
        opts = m.super_options.split(",")
        if (m.fstype == "cgroup" and any(n in opts for n in JOINED_NAMED)
                and not any(o in LOGICAL for o in opts) and m.mount_point not in out):
            out.append(m.mount_point)
    return tuple(out)


def read_controllers(root: str) -> frozenset[str]:
    try:
        with open(os.path.join(root, "cgroup.controllers")) as f:
            return frozenset(f.read().split())
    except OSError:
        return frozenset()


def detect_layout(mountinfo: str = "/proc/self/mountinfo", v2_root: str | None = None) -> Layout:
    """The machine's layout; ``v2_root`` forces a pure v2 layout rooted at that directory."""
    if v2_root is not None:
        return Layout({}, v2_root, read_controllers(v2_root))
    mounts = linux.mountinfo(mountinfo)
    v1, v2, dynmods = hierarchies(mounts)
    return Layout(v1, v2, read_controllers(v2) if v2 else frozenset(), dynmods, named_hierarchies(mounts))
