"""The one Sandbox: its hostname, pinned UTS/IPC namespaces, sandbox PID namespace, DNS, kernel
modules, sandbox storages and guest hooks, made by CreateSandbox and released by DestroySandbox.

Every step registers its undo; a failure rolls back everything the call did (fault points:
agent.undo). What a container takes from the sandbox is read from here by CreateContainer
(agent.create_container); the sandbox never calls the runtime.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field

from agent import hooks, linux
from agent.errors import AlreadyExists, FailedPrecondition, Internal, InvalidArgument
from agent.hooks import Hooks
from agent.runtime import command
from agent.runtime.reaper import REAPER
from agent.runtime.spawner import Spawner
from agent.storage import Checked, MountContext, StorageManager, paths
from agent.storage.syscalls import MNT_DETACH, MS_BIND, mount, mount_bind, mounts_under, umount
from agent.uevent import UeventListener
from agent.undo import UndoStack, fault_point
from agent.validate import check_id

log = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
HOSTNAME_MAX = 64
PINNED = ("uts", "ipc")
_MODULE = re.compile(r"[A-Za-z0-9_-]+")


# --- namespaces -------------------------------------------------------------------------------

def pin_namespaces(ns_dir: str, hostname: str) -> dict[str, str]:
    """Create fresh UTS and IPC namespaces in a short-lived thread and pin them with bind mounts.

    UTS and IPC belong to the thread (nsproxy), so the agent's own threads never move. Returns
    ``{"uts": path, "ipc": path}``; on failure nothing stays mounted or created.
    """
    os.makedirs(ns_dir, mode=0o711, exist_ok=True)
    targets = {kind: os.path.join(ns_dir, kind) for kind in PINNED}
    result: dict[str, BaseException | None] = {"error": None}

    def work() -> None:
        try:
            linux.unshare(linux.CLONE_NEWUTS | linux.CLONE_NEWIPC)
            if hostname:
                linux.sethostname(hostname)
            for kind, target in targets.items():
                if os.path.exists(target):
                    raise FileExistsError(f"{target}: already exists")
                open(target, "x").close()
                mount(f"/proc/thread-self/ns/{kind}", target, None, MS_BIND)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=work, name="pin-namespaces")
    thread.start()
    thread.join()
    if result["error"] is not None:
        unpin_namespaces(targets)
        raise result["error"]
    return targets


def unpin_namespaces(pinned: dict[str, str]) -> None:
    for target in pinned.values():
        try:
            umount(target, MNT_DETACH)
        except OSError:
            pass
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass


# --- the sandbox ------------------------------------------------------------------------------

@dataclass
class SandboxState:
    sandbox_id: str = ""
    hostname: str = ""
    pinned: dict[str, str] = field(default_factory=dict)
    pidns_pid: int = 0
    hooks: Hooks = field(default_factory=Hooks)  # the guest's (guest_hook_path)
    storages: list[str] = field(default_factory=list)


class Sandbox:
    def __init__(self, run_dir: str, hotplug_timeout: float, spawner: Spawner,
                 uevents: UeventListener | None) -> None:
        self.spawner = spawner
        run_dir = os.path.realpath(run_dir)
        self.kata_root = os.path.join(run_dir, "kata-containers")
        self.ns_dir = os.path.join(run_dir, "sandbox-ns")
        self.shared_dir = os.path.join(self.kata_root, "shared", "containers")
        self.resolv_conf = RESOLV_CONF
        os.makedirs(self.shared_dir, mode=0o755, exist_ok=True)
        os.makedirs(self.ns_dir, mode=0o711, exist_ok=True)
        self.storages = StorageManager(MountContext(
            uevents=uevents, hotplug_timeout=hotplug_timeout,
            kata_root=self.kata_root, run_dir=run_dir))
        self.state: SandboxState | None = None
        self._teardown = UndoStack()
        self._lifeline = -1
        self.lock = asyncio.Lock()

    @property
    def created(self) -> bool:
        return self.state is not None

    # --- CreateSandbox ---
    def check_create(self, req) -> list[Checked]:
        """Check the whole request before anything is done; returns the checked storages."""
        check_id(req.sandbox_id, "sandbox_id", allow_empty=True)
        if len(req.hostname.encode()) > HOSTNAME_MAX or any(c in req.hostname for c in "\0\n/"):
            raise InvalidArgument(f"hostname: {req.hostname!r} is not a valid host name")
        for i, line in enumerate(req.dns):
            if "\n" in line or "\0" in line:
                raise InvalidArgument(f"dns[{i}]: must be one line")
        for i, mod in enumerate(req.kernel_modules):
            if not _MODULE.fullmatch(mod.name):
                raise InvalidArgument(f"kernel_modules[{i}].name: {mod.name!r} is not a module name")
            for j, p in enumerate(mod.parameters):
                if not p or p.startswith("-") or any(c.isspace() for c in p):
                    raise InvalidArgument(f"kernel_modules[{i}].parameters[{j}]: {p!r} is not NAME=VALUE")
        if req.guest_hook_path and not req.guest_hook_path.startswith("/"):
            raise InvalidArgument(f"guest_hook_path: {req.guest_hook_path!r} is not absolute")
        return self.storages.check(req.storages, "storages")

    async def create(self, req) -> None:
        async with self.lock:
            if self.created:
                raise AlreadyExists(f"sandbox: already created (sandbox_id {self.state.sandbox_id!r}); "
                                    "DestroySandbox first")
            storages = self.check_create(req)
            state = SandboxState(sandbox_id=req.sandbox_id, hostname=req.hostname)
            async with UndoStack() as undo:
                await self._create_steps(req, storages, state, undo)
                self._teardown = undo.commit()
            self.state = state
            log.info("sandbox created", extra={"fields": {"sandbox_id": req.sandbox_id}})

    async def _create_steps(self, req, storages: list[Checked], state: SandboxState,
                            undo: UndoStack) -> None:
        state.pinned = pin_namespaces(self.ns_dir, req.hostname)
        undo.push("pinned namespaces", lambda p=state.pinned: unpin_namespaces(p))
        fault_point("pin_namespaces")
        if req.sandbox_pidns:
            state.pidns_pid = await self._start_pidns_init()
            undo.push("sandbox pid namespace", lambda pid=state.pidns_pid: self.stop_pidns_init(pid))
        fault_point("sandbox_pidns")
        if req.dns:
            self._setup_dns(list(req.dns), undo)
        fault_point("dns")
        for i, mod in enumerate(req.kernel_modules):
            await self._load_module(mod, f"kernel_modules[{i}]", undo)
        fault_point("kernel_modules")
        state.storages = await self.storages.add_all(storages, undo)
        fault_point("sandbox_storages")
        if req.guest_hook_path:
            state.hooks = hooks.scan(req.guest_hook_path)
        fault_point("guest_hooks")

    async def _start_pidns_init(self) -> int:
        lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
        try:
            reply = await self.spawner.run_task("sandbox-pidns-init", {}, (lifeline_r,))
        except BaseException:
            os.close(lifeline_w)
            raise
        finally:
            os.close(lifeline_r)
        pid = int(reply.get("init_pid", 0)) if isinstance(reply, dict) else 0
        if pid <= 0:
            os.close(lifeline_w)
            raise Internal(f"sandbox_pidns: init did not start: {reply!r}")
        self._lifeline = lifeline_w  # held until the init is killed; if the agent dies, it exits
        try:
            await self._reap_worker(int(reply.get("pid", 0)))
        except BaseException:  # cancelled (deadline, closed connection): the caller has no undo yet
            self.stop_pidns_init(pid)
            raise
        return pid

    @staticmethod
    async def _reap_worker(worker: int) -> None:
        """The task's worker exits after its reply; once it is gone the init is our child."""
        if worker > 0:
            try:
                await asyncio.wait_for(REAPER.wait(worker), 5)
            except asyncio.TimeoutError:
                log.warning("sandbox pidns task worker %d did not exit", worker)

    def stop_pidns_init(self, pid: int) -> None:
        _kill(pid)
        if self._lifeline >= 0:
            os.close(self._lifeline)
            self._lifeline = -1

    def shutdown(self) -> None:
        """At agent exit: the sandbox PID namespace must not outlive the agent."""
        if self.state and self.state.pidns_pid:
            self.stop_pidns_init(self.state.pidns_pid)

    def _setup_dns(self, lines: list[str], undo: UndoStack) -> None:
        sandbox_dir = os.path.join(self.kata_root, "sandbox")
        created = paths.ensure_dirs(self.kata_root, sandbox_dir, "dns")
        undo.push("sandbox dir", lambda: paths.remove_dirs(created))
        source = os.path.join(sandbox_dir, "resolv.conf")
        with open(source, "w") as f:
            f.write("".join(line + "\n" for line in lines))
        undo.push("resolv.conf", lambda: paths.unlink_missing(source))
        target = self.resolv_conf
        if not os.path.lexists(target):
            open(target, "x").close()
            undo.push("resolv.conf target", lambda: paths.unlink_missing(target))
        mount_bind(source, target, recursive=False)
        undo.push("resolv.conf bind", lambda: umount(target, MNT_DETACH))

    async def _load_module(self, mod, what: str, undo: UndoStack) -> None:
        loaded = os.path.isdir(f"/sys/module/{mod.name.replace('-', '_')}")
        done = await command.run(["modprobe", mod.name, *mod.parameters], timeout=30)
        if done.returncode != 0:
            raise FailedPrecondition(f"{what} ({mod.name}): {done.error_text()}")
        if not loaded:
            undo.push(f"module {mod.name}", lambda: command.run(["modprobe", "-r", mod.name]))

    # --- DestroySandbox ---
    async def destroy(self) -> None:
        """Release what CreateSandbox made; the containers are gone already (DestroySandbox).

        The rollback of CreateSandbox's steps releases the sandbox's storages; with the
        containers' references released at their removal, a storage still mounted after it is
        a leak, logged and taken down by the sweep."""
        async with self.lock:
            await self._teardown.rollback()
            self.storages.sweep_leaks()
            self._clear_state()
            self.state = None
            log.info("sandbox destroyed")

    def _clear_state(self) -> None:
        """Unmount whatever is left under /run/kata-containers and empty it."""
        for mp in mounts_under(self.kata_root):
            if mp != self.kata_root:
                try:
                    umount(mp, MNT_DETACH)
                except OSError as exc:
                    log.warning("cannot unmount %s: %s", mp, exc)
        if [mp for mp in mounts_under(self.kata_root) if mp != self.kata_root]:
            log.error("mounts remain under %s; not clearing it", self.kata_root)
            return
        import shutil

        for name in os.listdir(self.kata_root):
            path = os.path.join(self.kata_root, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                paths.unlink_missing(path)
        os.makedirs(self.shared_dir, mode=0o755, exist_ok=True)

    # --- what containers take from the sandbox ---
    def pinned_namespaces(self, sandbox_pidns: bool) -> dict[str, str]:
        """The namespaces a container joins, by OCI type: the pinned UTS and IPC ones, and the
        sandbox's PID namespace if asked (check it exists with ``check_pidns`` first)."""
        wanted = dict(self.state.pinned) if self.state else {}
        if sandbox_pidns:
            wanted["pid"] = f"/proc/{self.state.pidns_pid}/ns/pid"
        return wanted

    def check_pidns(self, sandbox_pidns: bool) -> None:
        if sandbox_pidns and not (self.state and self.state.pidns_pid):
            raise FailedPrecondition("sandbox_pidns: the sandbox has no PID namespace "
                                     "(CreateSandbox without sandbox_pidns)")

    def dns_source(self) -> str | None:
        """The sandbox's resolv.conf (CreateSandbox's dns), for containers to see; None if none."""
        source = os.path.join(self.kata_root, "sandbox", "resolv.conf")
        return source if self.state and os.path.exists(source) else None

    def guest_hooks(self) -> Hooks:
        return self.state.hooks if self.state else Hooks()



def _kill(pid: int) -> None:
    """Kill the sandbox PID namespace init (and with it every process in the namespace)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)
