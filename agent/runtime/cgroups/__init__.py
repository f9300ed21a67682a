"""Cgroups v1, v2 and hybrid for containers.

``manager = detect()`` once per agent; then per container
``cg = manager.create(cgroups_path, resources, owner=container_id)``, and
``cg.procs_files()`` / ``cg.pids()`` / ``cg.update(res)`` / ``cg.stats()`` /
``await cg.freeze()`` / ``await cg.thaw()`` / ``cg.kill_all(sig)`` / ``cg.destroy()``.
``await manager.next_oom_event()`` returns the owner of the next cgroup with an OOM kill.

Modules: cgpath (CgroupsPath forms), layout (which hierarchy serves which controller), plan
(LinuxResources -> validated file writes, pure), apply (writing, with errors naming the field),
stats (CgroupStats), oom (OOM watching in the event loop), manager (Manager and Cgroup).
"""

from __future__ import annotations

from agent.runtime.cgroups.layout import Layout, detect_layout
from agent.runtime.cgroups.manager import Cgroup, Manager

__all__ = ["Cgroup", "Layout", "Manager", "detect"]


def detect(root: str | None = None, mountinfo: str = "/proc/self/mountinfo") -> Manager:
    """The manager for this machine's cgroups.

    ``root`` (tests) makes a pure cgroup v2 manager that treats that directory, inside a cgroup2
    mount, as the hierarchy root.
    """
    return Manager(detect_layout(mountinfo, root))
