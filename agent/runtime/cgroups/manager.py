"""The cgroup manager (one per agent) and the Cgroup of one container."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from agent.errors import DeadlineExceeded, FailedPrecondition, Internal
from agent.protocols import agent_pb2, oci_pb2
from agent.runtime.cgroups import cgpath, files, stats
from agent.runtime.cgroups.apply import Undo, apply
from agent.runtime.cgroups.layout import V2_DEFAULT, V2_NAME, Layout
from agent.runtime.cgroups.oom import OomWatcher, Watch
from agent.runtime.cgroups.plan import Plan, make_plan

log = logging.getLogger("agent.cgroups")

CREATE_PREFIX = "OCI.Linux.Resources"
UPDATE_PREFIX = "resources"
FREEZE_TIMEOUT = 5.0
RMDIR_TIMEOUT = 1.0


class Manager:
    """Creates cgroups in every hierarchy of a Layout and watches them for OOM kills."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.oom = OomWatcher()
        self.hugepage_sizes = stats.hugepage_sizes()
        self.owned: set[str] = set()  # directories this manager created and has not removed
        self.kept: list[str] = []  # parents made by keep(), removed by close()

    @property
    def mode(self) -> str:
        return self.layout.mode

    def version(self, logical: str) -> int | None:
        route = self.layout.route(logical)
        return route.version if route else None

    def create(self, path: str, resources: oci_pb2.LinuxResources | None, owner: str) -> Cgroup:
        """Create the cgroup at Linux.CgroupsPath and apply ``resources``; all or nothing."""
        if self.layout.mode == "none":
            raise FailedPrecondition("cgroups: no cgroup hierarchy is mounted")
        rel = cgpath.resolve(path, owner)
        plan = make_plan(resources, self.version, CREATE_PREFIX)
        cg = Cgroup(self, rel, owner)
        try:
            for root in self.layout.roots():
                self._make_dirs(cg, root, plan)
            apply(plan, cg.dir_of, CREATE_PREFIX)
            cg.set_device_filter(plan, CREATE_PREFIX)
            if self.version("memory") is not None:
                cg.watch = self.oom.watch(cg.dir_of("memory"), self.version("memory") or 0, owner)
        except BaseException:
            cg.undo_create()
            raise
        log.debug("cgroup created", extra={"fields": {"container_id": owner, "cgroup": rel}})
        return cg

    # ---- directories ----

    def keep(self, rel: str) -> None:
        """Make the parent ``rel`` in every hierarchy now, and leave it until close().

        The containers' default cgroups are its children: each container then costs one mkdir and
        one rmdir per hierarchy instead of two, and no cpuset copy for the parent. A directory
        that exists already is used, never removed.
        """
        if self.layout.mode == "none":
            return
        for root in self.layout.roots():
            directory = os.path.join(root, rel)
            try:
                os.mkdir(directory, 0o755)
            except FileExistsError:
                continue
            except OSError as exc:
                log.warning("cannot create %s: %s", directory, exc)
                continue
            self.kept.append(directory)
            if root == self.layout.v1.get("cpuset"):
                _copy_cpuset(root, directory)

    def _v2_needed(self, plan: Plan) -> tuple[set[str], set[str]]:
        """(controllers the plan needs enabled, controllers wanted for stats) on the v2 side."""
        required = {V2_NAME[c] for c in plan.controllers if self.version(c) == 2 and c in V2_NAME}
        wanted = set(V2_DEFAULT) if self.layout.mode == "v2" else set()
        return required, wanted - required

    def _make_dirs(self, cg: Cgroup, root: str, plan: Plan) -> None:
        is_v2 = root == self.layout.v2
        required, wanted = self._v2_needed(plan) if is_v2 else (set(), set())
        current = root
        for part in cg.path.split("/"):
            if is_v2:
                self._enable(cg, current, required, wanted)
            child = os.path.join(current, part)
            try:
                os.mkdir(child, 0o755)
            except FileExistsError:
                current = child
                continue
            cg.created.append(child)
            self.owned.add(child)
            if root == self.layout.v1.get("cpuset"):
                _copy_cpuset(current, child)
            current = child

    def _enable(self, cg: Cgroup, directory: str, required: set[str], wanted: set[str]) -> None:
        if not required and not wanted:
            return
        enabled = set((files.read_opt(os.path.join(directory, "cgroup.subtree_control")) or "").split())
        available = set((files.read_opt(os.path.join(directory, "cgroup.controllers")) or "").split())
        for ctrl in sorted((required | wanted) - enabled):
            if ctrl not in available:
                if ctrl in required:
                    raise FailedPrecondition(f"{cgpath.FIELD}: the {ctrl} controller is not "
                                             f"available in {directory}")
                continue
            try:
                files.write(os.path.join(directory, "cgroup.subtree_control"), f"+{ctrl}")
            except OSError as exc:
                if ctrl in required:
                    raise FailedPrecondition(f"{cgpath.FIELD}: cannot enable the {ctrl} controller "
                                             f"in {directory}: {os.strerror(exc.errno or 0)}") from None
                log.debug("cannot enable %s in %s: %s", ctrl, directory, exc)
                continue
            if directory not in self.owned:
                cg.enabled.append((directory, ctrl))

    def remove_dir(self, directory: str, timeout: float = 0.0) -> bool:
        """rmdir one directory this manager owns, retrying while its processes drain."""
        deadline = time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise
                if time.monotonic() >= deadline:
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            self.owned.discard(directory)
            return True

    def remove_owned_ancestors(self, root: str, leaf: str) -> None:
        """Remove the parents this manager created, until one is still in use."""
        current = os.path.dirname(leaf)
        while current != root and current.startswith(root + "/") and current in self.owned:
            if not self.remove_dir(current):
                return
            current = os.path.dirname(current)

    async def next_oom_event(self) -> str:
        """The owner of the next cgroup that had an OOM kill (queued if nobody waits)."""
        return await self.oom.next_event()

    def close(self) -> None:
        self.oom.close()
        for directory in reversed(self.kept):
            try:
                os.rmdir(directory)
            except OSError as exc:
                log.warning("cannot remove %s: %s", directory, exc)
        self.kept = []


def _copy_cpuset(parent: str, child: str) -> None:
    """A new v1 cpuset is empty and refuses tasks: start it with its parent's cpus and mems."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        value = (files.read_opt(os.path.join(parent, name)) or "").strip()
        if value and not (files.read_opt(os.path.join(child, name)) or "").strip():
            files.write(os.path.join(child, name), value)


@dataclass
class Cgroup:
    manager: Manager
    path: str  # relative to each hierarchy root, e.g. "kata_agent/abc"
    owner: str
    created: list[str] = field(default_factory=list)  # made by create(), top-down
    enabled: list[tuple[str, str]] = field(default_factory=list)  # (dir, controller) enabled
    watch: Watch | None = None
    bpf_fd: int = -1  # v2: the attached eBPF device filter
    destroyed: bool = False

    @property
    def dirs(self) -> list[str]:
        return [os.path.join(root, self.path) for root in self.manager.layout.roots()]

    def dir_of(self, logical: str) -> str:
        route = self.manager.layout.route(logical)
        if route is None:
            raise Internal(f"cgroups: the {logical} controller is not available")
        return os.path.join(route.root, self.path)

    def _where(self, logical: str) -> tuple[str, int] | None:
        route = self.manager.layout.route(logical)
        return (os.path.join(route.root, self.path), route.version) if route else None

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid into to join this cgroup."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _primary(self) -> str:
        where = self._where("freezer") or self._where("pids") or self._where("memory")
        return where[0] if where else self.dirs[0]

    def pids(self) -> list[int]:
        """Every process in the cgroup and its descendants."""
        out: list[int] = []
        for directory, _, names in os.walk(self._primary()):
            if "cgroup.procs" in names:
                text = files.read_opt(os.path.join(directory, "cgroup.procs")) or ""
                out.extend(int(x) for x in text.split())
        return sorted(set(out))

    def update(self, resources: oci_pb2.LinuxResources, prefix: str = UPDATE_PREFIX) -> None:
        """Change limits live; on a refused value, the values written so far are put back."""
        plan = make_plan(resources, self.manager.version, prefix)
        if self.manager.layout.v2:
            self._enable_v2_for(plan)
        undo = Undo()
        try:
            apply(plan, self.dir_of, prefix, undo)
            self.set_device_filter(plan, prefix)
        except BaseException:
            undo.run()
            raise

    def set_device_filter(self, plan: Plan, prefix: str) -> None:
        """v2: attach an eBPF program for the plan's device rules, replacing the previous one."""
        if not plan.device_rules:
            return
        from agent.runtime.cgroups import devices_bpf  # ctypes and the eBPF assembler: 0.04 s of a TCG guest's boot

        directory = self.dir_of("devices")
        rules = [devices_bpf.parse_rule(f, r) for f, r in plan.device_rules]
        try:
            fd = devices_bpf.attach(directory, rules)
        except OSError as exc:
            raise FailedPrecondition(f"{prefix}.Devices: cannot attach the eBPF device filter: "
                                     f"{exc.strerror or exc}") from None
        old, self.bpf_fd = self.bpf_fd, fd
        if old >= 0:
            devices_bpf.detach(directory, old)

    def _close_filter(self) -> None:
        if self.bpf_fd >= 0:
            os.close(self.bpf_fd)
            self.bpf_fd = -1

    def _enable_v2_for(self, plan: Plan) -> None:
        root = self.manager.layout.v2 or ""
        required, _ = self.manager._v2_needed(plan)
        current = root
        for part in self.path.split("/"):
            self.manager._enable(self, current, required, set())
            current = os.path.join(current, part)

    def stats(self) -> agent_pb2.CgroupStats:
        return stats.collect(self._where, self.manager.hugepage_sizes)

    # ---- freezer ----

    def _freezer(self) -> tuple[str, int]:
        where = self._where("freezer")
        if where is None:
            raise FailedPrecondition("cgroups: no freezer is available")
        return where

    def is_frozen(self) -> bool:
        directory, version = self._freezer()
        if version == 1:
            return (files.read_opt(os.path.join(directory, "freezer.state")) or "").strip() != "THAWED"
        return files.read_kv(os.path.join(directory, "cgroup.events")).get("frozen", 0) == 1

    def _set_frozen(self, frozen: bool) -> None:
        directory, version = self._freezer()
        if version == 1:
            files.write(os.path.join(directory, "freezer.state"), "FROZEN" if frozen else "THAWED")
        else:
            files.write(os.path.join(directory, "cgroup.freeze"), "1" if frozen else "0")

    def _settled(self, frozen: bool) -> bool:
        directory, version = self._freezer()
        if version == 1:
            state = (files.read_opt(os.path.join(directory, "freezer.state")) or "").strip()
            return state == ("FROZEN" if frozen else "THAWED")
        return self.is_frozen() == frozen

    async def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze every process; waits (in the loop) until the kernel reports the cgroup frozen.
        On timeout the cgroup is thawed again and DeadlineExceeded raised."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        self._set_frozen(True)
        while not self._settled(True):
            if time.monotonic() >= deadline:
                self._set_frozen(False)
                raise DeadlineExceeded(f"cgroup {self.path}: not frozen after {timeout:g} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
            self._set_frozen(True)  # v1: a FREEZING cgroup may need another nudge

    def thaw(self, timeout: float = 1.0) -> None:
        """Thaw; synchronous, since the kernel thaws at once (callers may be in cleanup paths)."""
        deadline = time.monotonic() + timeout
        self._set_frozen(False)
        while not self._settled(False):
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"cgroup {self.path}: not thawed after {timeout:g} s")
            time.sleep(0.001)

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process in the cgroup (thawing it so they can act); the count signalled."""
        count = 0
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                count += 1
            except ProcessLookupError:
                continue
        if self._where("freezer") and self.is_frozen():
            self._set_frozen(False)
        return count

    # ---- removal ----

    def undo_create(self) -> None:
        self.manager.oom.unwatch(self.watch)
        self._close_filter()
        for directory in reversed(self.created):
            try:
                self.manager.remove_dir(directory)
            except OSError as exc:
                log.warning("undo: cannot remove %s: %s", directory, exc)
        for directory, ctrl in reversed(self.enabled):
            try:
                files.write(os.path.join(directory, "cgroup.subtree_control"), f"-{ctrl}")
            except OSError as exc:
                log.debug("undo: cannot disable %s in %s: %s", ctrl, directory, exc)
        self.destroyed = True

    def destroy(self, timeout: float = RMDIR_TIMEOUT) -> None:
        """Remove the directories this cgroup's manager created, deepest first. Idempotent.

        FailedPrecondition when processes remain after ``timeout`` (kill and reap them first).
        """
        if self.destroyed:
            return
        self.manager.oom.unwatch(self.watch)
        busy = []
        for root, leaf in zip(self.manager.layout.roots(), self.dirs):
            if leaf in self.manager.owned and not self.manager.remove_dir(leaf, timeout):
                busy.append(leaf)
                timeout = 0.0  # waited once already
                continue
            self.manager.remove_owned_ancestors(root, leaf)
        self._close_filter()  # the kernel drops the program with the cgroup
        if busy:
            raise FailedPrecondition(f"cgroup {self.path}: still has processes {self.pids()} "
                                     f"({', '.join(busy)})")
        self.destroyed = True
