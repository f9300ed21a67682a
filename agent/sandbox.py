"""The one Sandbox: hostname, pinned UTS/IPC namespaces, sandbox PID namespace, DNS, kernel
modules, sandbox storages, guest hooks, and the per-container preparation (devices, storages,
namespace rewrite, bundle) that CreateContainer runs before the runtime creates the container.

Every step registers its undo; a failure rolls back everything the call did. Fault injection for
tests: ``KATA_AGENT_FAULT_INJECT=step,step`` makes the named steps fail right after they succeeded
(steps: pin_namespaces sandbox_pidns dns kernel_modules sandbox_storages guest_hooks, and per
container devices storages namespaces bundle).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field

from google.protobuf import json_format

from agent import devices, linux
from agent.errors import (AlreadyExists, FailedPrecondition, Internal, InvalidArgument,
                          Unimplemented)
from agent.protocols import oci_pb2
from agent.runtime import command
from agent.runtime.reaper import REAPER
from agent.runtime.spawner import Spawner
from agent.storage import MountContext, StorageManager, paths
from agent.storage.syscalls import MNT_DETACH, MS_BIND, mount, mount_bind, mounts_under, umount
from agent.uevent import UeventListener
from agent.undo import UndoStack
from agent.validate import check_id

log = logging.getLogger(__name__)

FAULT_ENV = "KATA_AGENT_FAULT_INJECT"
RESOLV_CONF = "/etc/resolv.conf"
HOSTNAME_MAX = 64
PINNED = ("uts", "ipc")
HOOK_STAGES = ("prestart", "poststart", "poststop")
_MODULE = re.compile(r"[A-Za-z0-9_-]+")


def fault_point(step: str) -> None:
    """Fail here when a test asked for it (``KATA_AGENT_FAULT_INJECT``)."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted and step in wanted.split(","):
        raise Internal(f"fault injected after step {step}")


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


def rewrite_namespaces(spec, paths_by_kind: dict[str, str]) -> None:
    """Point (or add) the spec's namespace entries of these kinds at the given paths."""
    entries = spec.Linux.Namespaces
    for kind, path in paths_by_kind.items():
        entry = next((n for n in entries if n.Type == kind), None)
        if entry is None:
            entry = entries.add(Type=kind)
        entry.Path = path
    if "uts" in paths_by_kind:
        spec.Hostname = ""  # the container shares the sandbox's hostname


# --- guest hooks ------------------------------------------------------------------------------

def _hook_from_json(path: str) -> tuple[list[str], oci_pb2.Hook]:
    with open(path) as f:
        data = json.load(f)
    body = data.get("hook", data)
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise InvalidArgument(f"guest_hook_path: {path}: no hook path")
    hook = oci_pb2.Hook(Path=body["path"], Args=body.get("args") or [body["path"]],
                        Env=body.get("env") or [], Timeout=int(body.get("timeout") or 0))
    return list(data.get("stages") or []), hook


def scan_hooks(root: str) -> dict[str, list[oci_pb2.Hook]]:
    """Hooks under ``root``: ``STAGE/*`` executables (Kata's layout) and OCI hook JSON files
    (``STAGE/*.json``, or ``*.json`` naming their ``stages``)."""
    found: dict[str, list[oci_pb2.Hook]] = {s: [] for s in HOOK_STAGES}
    if not os.path.isdir(root):
        log.warning("guest_hook_path %s is not a directory; no guest hooks", root)
        return found
    for name in sorted(os.listdir(root)):
        if name.endswith(".json"):
            stages, hook = _hook_from_json(os.path.join(root, name))
            for stage in stages:
                if stage in found:
                    found[stage].append(hook)
    for stage in HOOK_STAGES:
        folder = os.path.join(root, stage)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".json"):
                found[stage].append(_hook_from_json(path)[1])
            elif os.path.isfile(path) and os.access(path, os.X_OK):
                found[stage].append(oci_pb2.Hook(Path=path, Args=[path, stage]))
    return found


async def run_hooks(hooks, state: dict, stage: str) -> None:
    """Run OCI hooks with the container state on stdin; a failing prestart/poststart hook raises,
    a failing poststop hook is logged (runtime-spec). For the runtime to call."""
    for hook in hooks:
        argv = [hook.Path, *list(hook.Args)[1:]]
        env = dict(e.split("=", 1) for e in hook.Env if "=" in e)
        try:
            done = await command.run(argv, input=json.dumps(state).encode(),
                                     timeout=float(hook.Timeout or 60), env=env)
            failure = done.error_text() if done.returncode else ""
        except (OSError, TimeoutError) as exc:
            failure = str(exc)
        if failure:
            if stage == "poststop":
                log.warning("poststop hook failed", extra={"fields": {"hook": hook.Path, "error": failure}})
                continue
            raise FailedPrecondition(f"{stage} hook {hook.Path}: {failure}")


# --- the sandbox ------------------------------------------------------------------------------

@dataclass
class SandboxState:
    sandbox_id: str = ""
    hostname: str = ""
    pinned: dict[str, str] = field(default_factory=dict)
    pidns_pid: int = 0
    hooks: dict[str, list] = field(default_factory=dict)
    storages: list[str] = field(default_factory=list)


class Sandbox:
    def __init__(self, run_dir: str, hotplug_timeout: float, spawner: Spawner,
                 uevents: UeventListener | None) -> None:
        self.spawner = spawner
        self.hotplug_timeout = hotplug_timeout
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
        self._teardown: list = []
        self._lifeline = -1
        self.lock = asyncio.Lock()

    @property
    def created(self) -> bool:
        return self.state is not None

    # --- CreateSandbox ---
    def check_create(self, req) -> None:
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
        self.storages.check(req.storages, "storages")

    async def create(self, req) -> None:
        async with self.lock:
            if self.created:
                raise AlreadyExists(f"sandbox: already created (sandbox_id {self.state.sandbox_id!r}); "
                                    "DestroySandbox first")
            self.check_create(req)
            state = SandboxState(sandbox_id=req.sandbox_id, hostname=req.hostname)
            async with UndoStack() as undo:
                await self._create_steps(req, state, undo)
                self._teardown = undo.commit()
            self.state = state
            log.info("sandbox created", extra={"fields": {"sandbox_id": req.sandbox_id}})

    async def _create_steps(self, req, state: SandboxState, undo: UndoStack) -> None:
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
        state.storages = await self.storages.add_all(req.storages, "storages", undo)
        fault_point("sandbox_storages")
        if req.guest_hook_path:
            state.hooks = scan_hooks(req.guest_hook_path)
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
        await self._reap_worker(int(reply.get("pid", 0)))
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
        undo.push("resolv.conf", lambda: _unlink(source))
        target = self.resolv_conf
        if not os.path.lexists(target):
            open(target, "x").close()
            undo.push("resolv.conf target", lambda: _unlink(target))
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
        """Release what CreateSandbox made; the containers are gone already (DestroySandbox)."""
        async with self.lock:
            self.storages.release_all()
            undo = UndoStack()
            for what, action in self._teardown:
                undo.push(what, action)
            await undo.rollback()
            self._teardown = []
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
                _unlink(path)
        os.makedirs(self.shared_dir, mode=0o755, exist_ok=True)

    # --- CreateContainer steps 2-5 ---
    def check_container(self, req) -> None:
        check_id(req.container_id, "container_id")
        if len(req.shared_mounts):
            raise Unimplemented("shared_mounts: sharing mounts between containers is not "
                                "implemented by this agent")
        for i, d in enumerate(req.devices):
            devices.check_device(d, f"devices[{i}]")
        self.storages.check(req.storages, "storages")
        if req.sandbox_pidns and not (self.state and self.state.pidns_pid):
            raise FailedPrecondition("sandbox_pidns: the sandbox has no PID namespace "
                                     "(CreateSandbox without sandbox_pidns)")
        if not req.OCI.Root.Path.startswith("/"):
            raise InvalidArgument(f"OCI.Root.Path: {req.OCI.Root.Path!r} is not absolute")
        if os.path.lexists(os.path.join(self.kata_root, req.container_id, "config.json")):
            raise AlreadyExists(f"container_id: {req.container_id!r} has a bundle already")

    async def prepare_container(self, req, undo: UndoStack) -> None:
        """Devices, storages, namespaces and bundle for CreateContainer; undos go on ``undo``."""
        self.check_container(req)
        spec = req.OCI
        if req.devices:
            await devices.prepare(self.storages.ctx.uevents, req.devices, spec,
                                  self.hotplug_timeout)
        fault_point("devices")
        await self.storages.add_all(req.storages, "storages", undo)
        fault_point("storages")
        self._rewrite_namespaces(req)
        self._add_dns_mount(spec)
        self._add_guest_hooks(spec)
        fault_point("namespaces")
        self._write_bundle(req, undo)
        fault_point("bundle")

    def _rewrite_namespaces(self, req) -> None:
        wanted = dict(self.state.pinned) if self.state else {}
        if req.sandbox_pidns:
            wanted["pid"] = f"/proc/{self.state.pidns_pid}/ns/pid"
        if wanted:
            rewrite_namespaces(req.OCI, wanted)

    def _add_dns_mount(self, spec) -> None:
        """Containers see the sandbox's DNS (as docker does), unless their spec mounts their own."""
        source = os.path.join(self.kata_root, "sandbox", "resolv.conf")
        if not self.state or not os.path.exists(source):
            return
        if any(os.path.normpath(m.destination) == RESOLV_CONF for m in spec.Mounts):
            return
        spec.Mounts.add(destination=RESOLV_CONF, source=source, type="bind",
                        options=["bind", "ro", "nosuid", "nodev", "noexec"])

    def _add_guest_hooks(self, spec) -> None:
        if not self.state or not self.state.hooks:
            return
        for stage, field_name in (("prestart", "Prestart"), ("poststart", "Poststart"),
                                  ("poststop", "Poststop")):
            getattr(spec.Hooks, field_name).extend(self.state.hooks.get(stage, []))

    def bundle_dir(self, cid: str) -> str:
        return os.path.join(self.kata_root, cid)

    def _write_bundle(self, req, undo: UndoStack) -> None:
        cid = req.container_id
        walk = paths.walk_dirs(self.kata_root, [cid, "rootfs"], mode=0o755)
        walk.close()
        created = walk.created
        undo.push("bundle dirs", lambda: paths.remove_dirs(created))
        rootfs = os.path.join(self.bundle_dir(cid), "rootfs")
        source = req.OCI.Root.Path
        if source != rootfs:
            if not os.path.isdir(source):
                raise InvalidArgument(f"OCI.Root.Path: {source!r} is not a directory")
            mount_bind(source, rootfs)
            undo.push("rootfs bind", lambda: umount(rootfs, MNT_DETACH))
            req.OCI.Root.Path = rootfs
        config = os.path.join(self.bundle_dir(cid), "config.json")
        tmp = config + ".tmp"
        with open(tmp, "w") as f:
            f.write(json_format.MessageToJson(req.OCI, preserving_proto_field_name=True))
        os.rename(tmp, config)
        undo.push("config.json", lambda: _unlink(config))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
