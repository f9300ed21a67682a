"""Containers and their processes: the Runtime API the RPC handlers (and other areas) use."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent import hooks, linux
from agent.errors import AlreadyExists, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound
from agent.hooks import Hooks
from agent.runtime import cgroups as cgroups_mod
from agent.runtime import protocol, seccomp
from agent.runtime import spawner as spawner_mod
from agent.runtime.protocol import Cgroup, CreateRequest, ExecRequest, Failed, Mapped, Ready, Start, UserNs
from agent.runtime.reaper import REAPER, exit_code
from agent.stdio import Stdio
from agent.undo import UndoStack, fault_point

if TYPE_CHECKING:  # agent.oci is imported by the first CreateContainer or ExecProcess (agent.rpc.containers)
    from agent.oci import ContainerConfig, CreateConfig, ProcessConfig

log = logging.getLogger(__name__)

KILL_WAIT = 10.0
MAX_RETIRED = 32  # undrained finished execs kept per container


@dataclass
class Process:
    exec_id: str
    pid: int
    stdio: Stdio
    exited: asyncio.Future  # raw wait status
    exit_status: int | None = None

    def __post_init__(self) -> None:
        self.exited.add_done_callback(self._record)

    def _record(self, fut: asyncio.Future) -> None:
        if not fut.cancelled():
            self.exit_status = exit_code(fut.result())

    @property
    def running(self) -> bool:
        return not self.exited.done()

    async def wait(self) -> int:
        return exit_code(await asyncio.shield(self.exited))


@dataclass
class Container:
    id: str
    config: ContainerConfig
    init: Process
    cgroup: Any = None
    sync: socket.socket | None = None  # to the init until it is started
    started: bool = False
    paused: bool = False
    processes: dict[str, Process] = field(default_factory=dict)
    # exec'd processes whose status WaitProcess returned: their id is free again (as Kata's
    # agent forgets them), their output stays readable until drained, then their fds go
    retired: dict[str, Process] = field(default_factory=dict)
    cleanup: UndoStack = field(default_factory=UndoStack)  # CreateContainer's undo, run at removal
    hooks: Hooks = field(default_factory=Hooks)
    oci_version: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    removing: bool = False  # killed and reaped; only the cgroup (or cleanup) is left to remove

    def state(self, status: str | None = None) -> dict[str, Any]:
        """The OCI state of the container, as hooks read it on stdin."""
        return {"ociVersion": self.oci_version or "1.0.2", "id": self.id, "status": status or self.status,
                "pid": self.init.pid, "bundle": os.path.dirname(self.config.rootfs),
                "annotations": dict(self.annotations)}

    @property
    def init_pid(self) -> int:
        return self.init.pid

    @property
    def status(self) -> str:
        if not self.init.running:
            return "stopped"
        if self.paused:
            return "paused"
        return "running" if self.started else "created"

    def process(self, exec_id: str) -> Process:
        """The init for an empty ``exec_id`` (or the container id), else an exec'd process."""
        if not exec_id or exec_id == self.id:
            return self.init
        proc = self.processes.get(exec_id) or self.retired.get(exec_id)
        if proc is None:
            raise NotFound(f"process {exec_id} not found in container {self.id}")
        return proc

    def retire(self, proc: Process) -> None:
        """Forget a finished, waited-for exec: free its id; close its stdio once drained."""
        if self.processes.get(proc.exec_id) is not proc:
            return
        del self.processes[proc.exec_id]
        self._drop_retired(proc.exec_id)
        if proc.stdio.drained:
            proc.stdio.close()
            return
        self.retired[proc.exec_id] = proc
        proc.stdio.on_drained = lambda: self._drop_retired(proc.exec_id, proc)
        while len(self.retired) > MAX_RETIRED:
            self._drop_retired(next(iter(self.retired)))

    def _drop_retired(self, exec_id: str, only: Process | None = None) -> None:
        proc = self.retired.get(exec_id)
        if proc is not None and (only is None or proc is only):
            del self.retired[exec_id]
            proc.stdio.close()


DEFAULT_CGROUP_PARENT = "kata-agent"  # containers without Linux.CgroupsPath get kata-agent/<id>


class Runtime:
    def __init__(self, spawner: spawner_mod.Spawner, run_dir: str = "/run", pipe_size: int = 0) -> None:
        self.spawner = spawner
        self.run_dir = run_dir
        self.pipe_size = pipe_size  # agent.container_pipe_size: 0 keeps the kernel's default
        self.containers: dict[str, Container] = {}
        self._reserved: set[str] = set()
        self._removals: dict[str, asyncio.Task] = {}  # removals under way, joined by later calls
        self._watchers: set[asyncio.Future] = set()
        self.cgroups = cgroups_mod.detect()
        self.cgroups.keep(DEFAULT_CGROUP_PARENT)

    # --- lookup ---
    def get(self, cid: str) -> Container:
        c = self.containers.get(cid)
        if c is None:
            raise NotFound(f"container {cid} not found")
        return c

    def ids(self) -> list[str]:
        return list(self.containers)

    def counts(self) -> tuple[int, int]:
        """Containers, and their processes still running (for the metrics)."""
        running = sum(1 for c in self.containers.values()
                      for p in (c.init, *c.processes.values()) if p.running)
        return len(self.containers), running

    @contextlib.contextmanager
    def reserve(self, cid: str) -> Iterator[None]:
        """Hold ``cid`` while it is being created, so a concurrent create of it fails."""
        if cid in self.containers or cid in self._reserved:
            raise AlreadyExists(f"container {cid} already exists")
        if cid in self._removals:
            raise AlreadyExists(f"container {cid} is still being removed")
        self._reserved.add(cid)
        try:
            yield
        finally:
            self._reserved.discard(cid)

    # --- create / start ---
    async def create(self, create_cfg: CreateConfig) -> Container:
        """Create the container: its init waits in its namespaces and rootfs for ``start``.

        Prestart and CreateRuntime hooks run once the init waits there. Either it is created
        and registered, or everything it did is undone.
        """
        cfg = create_cfg.container
        if cfg.seccomp is not None and not seccomp.available():
            raise FailedPrecondition("OCI.Linux.Seccomp: libseccomp.so.2 (package libseccomp2) is not installed")
        async with UndoStack() as undo:
            stdio, child_fds = Stdio.create(cfg.process.terminal, *cfg.process.console_size, self.pipe_size)
            undo.push("close stdio", stdio.close)
            # The cgroup is made while the spawner's child joins and unshares namespaces (and,
            # as the init, starts on the rootfs); it waits for the cgroup's directories (or EOF)
            # before it forks the init, or before its first step that needs the cgroup.
            req = CreateRequest(cfg, cgroup=None)
            try:
                _give_stdio(child_fds, cfg)
                sync = self.spawner.request(req, child_fds, new_pidns=self._init_is_zygote(cfg))
            finally:
                for fd in set(child_fds):
                    os.close(fd)
            undo.push("close the sync socket", sync.close)
            cg = self._create_cgroup(cfg, create_cfg.resources, undo)
            # (if the child failed, and exited, before it took the cgroup, its report follows)
            protocol.send(sync, _cgroup_dirs(cg))
            if cfg.new_namespace(linux.CLONE_NEWUSER):
                await _map_ids(sync, cfg)
            pid = await self._pid(sync, "create")
            init = Process(cfg.id, pid, stdio, REAPER.wait(pid))
            undo.push("kill the init", lambda: self._kill_and_reap(init))
            reply = await spawner_mod.receive(sync)
            if not isinstance(reply, Ready):
                raise self._setup_error(reply, init)
            c = Container(cfg.id, cfg, init, cgroup=cg, sync=sync, hooks=create_cfg.hooks,
                          oci_version=create_cfg.oci_version, annotations=dict(create_cfg.annotations))
            await self._run_hooks(c, "create", "creating")
            self.containers[cfg.id] = c
            undo.commit()  # from here on, remove() takes it all back
        return c

    @staticmethod
    async def _run_hooks(c: Container, point: str, status: str) -> None:
        for name, stage in hooks.AT[point]:
            listed = getattr(c.hooks, name)
            if listed:
                await hooks.run(listed, c.state(status), stage)

    def _init_is_zygote(self, cfg: ContainerConfig) -> bool:
        """Whether the spawner's PID 1 zygote can be this container's init (the short way): the
        container gets a new PID namespace, and has no v2 cgroup unless cgroup2 favors dynamic
        changes. The zygote joins its cgroup by moving itself; on v2 that is a cgroup.procs
        write, which waits for an RCU grace period (about 6 ms here) unless cgroup2 is mounted
        with favordynmods (as the guest's init does); the long way forks the init into its v2
        cgroup instead."""
        if not cfg.new_namespace(linux.CLONE_NEWPID) or any(f == linux.CLONE_NEWUSER for f, _ in cfg.namespaces):
            return False  # a PID namespace made before the user namespace would not be its
        layout = self.cgroups.layout
        return layout.v2 is None or layout.v2_dynmods

    def _create_cgroup(self, cfg: ContainerConfig, resources: Any, undo: UndoStack) -> Any:
        path = cfg.cgroups_path or f"{DEFAULT_CGROUP_PARENT}/{cfg.id}"
        cg = self.cgroups.create(path, resources, owner=cfg.id)
        undo.push("remove the cgroup", cg.destroy)
        _delegate_cgroup(cg, cfg)
        return cg

    @staticmethod
    async def _pid(sync: socket.socket, what: str) -> int:
        try:
            return await spawner_mod.receive_pid(sync)
        except spawner_mod.SpawnError as exc:
            raise _classify(what, str(exc)) from None

    @staticmethod
    def _setup_error(reply: protocol.Step | None, proc: Process) -> Exception:
        if reply is None:
            return Internal(f"container init (pid {proc.pid}) exited during set-up")
        if isinstance(reply, Failed):
            return _classify("create", reply.error)
        return Internal(f"spawner protocol: expected Ready, got {reply!r}")

    async def start(self, cid: str) -> None:
        c = self.get(cid)
        if c.started or c.sync is None:
            raise FailedPrecondition(f"container {cid} already started")
        if not c.init.running:
            raise FailedPrecondition(f"container {cid} is stopped")
        sync, c.sync = c.sync, None
        c.started = True
        try:
            sync.send(protocol.encode(Start()))
        except OSError:
            sync.close()
            raise
        # As runc start, do not wait for the exec (the program was found at create): its
        # rare failures (ENOEXEC, ...) are logged, and WaitProcess gives 127.
        task = asyncio.ensure_future(self._watch_exec(cid, sync))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        await self._run_hooks(c, "start", "running")

    @staticmethod
    async def _watch_exec(cid: str, sync: socket.socket) -> None:
        with sync:
            try:
                reply = await spawner_mod.receive(sync)
            except OSError:
                return
        if reply is not None:
            error = reply.error if isinstance(reply, Failed) else repr(reply)
            log.warning("container process did not start",
                        extra={"fields": {"container_id": cid, "error": error}})

    # --- exec ---
    async def exec(self, cid: str, exec_id: str, proc_cfg: ProcessConfig) -> Process:
        c = self.get(cid)
        if exec_id == cid or exec_id in c.processes:
            raise AlreadyExists(f"process {exec_id} already exists in container {cid}")
        if not c.init.running:
            raise FailedPrecondition(f"container {cid} is stopped")
        if not c.started:
            raise FailedPrecondition(f"container {cid} is not started")
        c.config.check_user(proc_cfg, "process")
        stdio, child_fds = Stdio.create(proc_cfg.terminal, *proc_cfg.console_size, self.pipe_size)
        req = ExecRequest(c.init_pid, proc_cfg, _cgroup_dirs(c.cgroup), c.config.seccomp)
        async with UndoStack() as undo:
            undo.push("close stdio", stdio.close)
            try:
                _give_stdio(child_fds, c.config)
                sync = self.spawner.request(req, child_fds)
            finally:
                for fd in set(child_fds):
                    os.close(fd)
            with sync:
                pid = await self._pid(sync, "exec")
                proc = Process(exec_id, pid, stdio, REAPER.wait(pid))
                undo.push("kill the process", lambda: self._kill_and_reap(proc))
                reply = await spawner_mod.receive(sync)
            if reply is not None:
                raise _classify("exec", reply.error if isinstance(reply, Failed) else f"unexpected {reply!r}")
            c._drop_retired(exec_id)  # the id is reused: the old output goes
            c.processes[exec_id] = proc
            undo.commit()
        return proc

    # --- wait / signal ---
    async def wait(self, cid: str, exec_id: str) -> int:
        c = self.get(cid)
        proc = c.process(exec_id)
        status = await proc.wait()
        if proc is not c.init:
            c.retire(proc)
        return status

    def signal(self, cid: str, exec_id: str, sig: int) -> None:
        c = self.get(cid)
        proc = c.process(exec_id)
        if proc is c.init and sig == signal.SIGKILL:
            self._kill_all(c)
            return
        if not proc.running:
            return  # as runc kill of a dead process is harmless here
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def _kill_all(self, c: Container) -> None:
        if c.cgroup is not None:
            c.cgroup.kill_all(signal.SIGKILL)  # also thaws a frozen cgroup so that they die
        for pid in {p.pid for p in (c.init, *c.processes.values()) if p.running}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _kill_and_reap(self, proc: Process, timeout: float = KILL_WAIT) -> None:
        if proc.running:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(asyncio.shield(proc.exited), timeout)
        except asyncio.TimeoutError:
            log.warning("process not reaped", extra={"fields": {"pid": proc.pid}})

    # --- remove ---
    async def remove(self, cid: str, timeout: float = 0) -> None:
        """Kill (SIGKILL at once, as Kata's destroy), reap, remove the cgroup, undo CreateContainer's
        steps, forget, run Poststop.

        ``timeout`` > 0 bounds how long the caller waits, as in Kata: past it, DEADLINE_EXCEEDED,
        and the removal goes on; a later RemoveContainer waits for that same removal. When the
        cgroup cannot be removed (FAILED_PRECONDITION), the container stays registered, stopped, so
        that RemoveContainer can be called again.
        """
        task = self._removals.get(cid)
        if task is None:
            task = asyncio.ensure_future(self._remove(self.get(cid)))
            self._removals[cid] = task
            task.add_done_callback(lambda t: self._removed(cid, t))
        try:
            # shielded: a caller that goes away or gives up does not cut the removal short
            await asyncio.wait_for(asyncio.shield(task), timeout if timeout > 0 else None)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"container {cid}: removal did not finish within {timeout:g}s; "
                                   "it goes on") from None

    def _removed(self, cid: str, task: asyncio.Task) -> None:
        if self._removals.get(cid) is task:
            del self._removals[cid]
        if not task.cancelled():
            task.exception()  # seen: the callers still waiting report it

    async def _remove(self, c: Container) -> None:
        if not c.removing:
            await self._stop(c)
            c.removing = True
        if c.cgroup is not None:
            c.cgroup.destroy()
        self.containers.pop(c.id, None)
        await c.cleanup.rollback()
        log.info("container removed", extra={"fields": {"container_id": c.id}})
        await self._run_hooks(c, "remove", "stopped")

    async def _stop(self, c: Container) -> None:
        self._kill_all(c)
        for proc in (c.init, *c.processes.values()):
            await self._kill_and_reap(proc)
        for proc in (c.init, *c.processes.values(), *c.retired.values()):
            proc.stdio.close()
        c.retired.clear()
        if c.sync is not None:
            c.sync.close()
            c.sync = None

    async def remove_all(self) -> None:
        for cid in list(self.containers):
            try:
                await self.remove(cid)
            except Exception:  # noqa: BLE001 - remove the others too
                log.exception("remove failed", extra={"fields": {"container_id": cid}})

    def close(self) -> None:
        self.cgroups.close()


def _cgroup_dirs(cg: Any) -> Cgroup:
    """The directories a new process of ``cg`` joins."""
    if cg is None:
        return Cgroup()
    v2, v1 = "", []
    for root, directory in zip(cg.manager.layout.roots(), cg.dirs):
        if root == cg.manager.layout.v2:
            v2 = directory
        else:
            v1.append(directory)
    return Cgroup(v2, v1)


# --- user namespaces ----------------------------------------------------------------------------

async def _map_ids(sync: socket.socket, cfg: ContainerConfig) -> None:
    """Write the uid_map and gid_map of the child that unshared the container's user namespace
    (protocol.UserNs), as runc's parent does, and tell it (protocol.Mapped)."""
    from agent.oci import map_text

    msg = await spawner_mod.receive(sync)
    if isinstance(msg, Failed):
        raise _classify("create", msg.error)
    if msg is None:
        raise Internal("the container's intermediate process exited before it made the user namespace")
    if not isinstance(msg, UserNs):
        raise Internal(f"spawner protocol: expected UserNs, got {msg!r}")
    for name, field_name, maps in (("uid_map", "UIDMappings", cfg.uid_mappings),
                                   ("gid_map", "GIDMappings", cfg.gid_mappings)):
        try:
            with open(f"/proc/{msg.pid}/{name}", "w") as f:
                f.write(map_text(maps))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EPERM):  # the process went, not the map
                raise Internal(f"writing {name} of pid {msg.pid}: {exc.strerror}") from None
            raise InvalidArgument(f"OCI.Linux.{field_name}: the kernel refused the map: {exc.strerror}") from None
    fault_point("userns_maps")
    protocol.send(sync, Mapped())


def _give_stdio(child_fds: list[int], cfg: ContainerConfig) -> None:
    """As runc: the stdio pipes (or the pty) belong to the container's mapped root, which can then
    reopen them (/dev/stdout, /proc/self/fd/1); without a user namespace they stay root's."""
    ids = cfg.host_ids()
    if ids is not None:
        for fd in set(child_fds):
            os.fchown(fd, *ids)


def _delegate_cgroup(cg: Any, cfg: ContainerConfig) -> None:
    """runc's rule (its systemd cgroup v2 driver): a container with a user namespace, its own
    cgroup namespace and a writable cgroup2 mount at /sys/fs/cgroup gets its v2 cgroup delegated:
    the directory and the files the kernel lists in /sys/kernel/cgroup/delegate are chowned to
    the host uid of the process's user. Nothing on cgroup v1."""
    v2 = cg.manager.layout.v2
    if v2 is None or not cfg.uid_mappings or not cfg.new_namespace(linux.CLONE_NEWCGROUP):
        return
    if not any(m.type == "cgroup" and m.destination == "/sys/fs/cgroup" and not m.flags & linux.MS_RDONLY
               for m in cfg.mounts):
        return
    ids = cfg.host_ids(cfg.process.uid)
    if ids is None:
        return
    directory = os.path.join(v2, cg.path)
    try:
        with open("/sys/kernel/cgroup/delegate") as f:
            names = f.read().split()
    except OSError:
        names = ["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"]
    os.chown(directory, ids[0], -1)
    for name in names:
        try:
            os.chown(os.path.join(directory, name), ids[0], -1)
        except FileNotFoundError:
            pass


def _classify(what: str, message: str) -> Exception:
    """A child's report as a status: missing files and bad users are the caller's fault."""
    text = f"{what}: {message}"
    lowered = message.lower()
    if "no such file" in lowered or "not found" in lowered or "permission denied" in lowered:
        return FailedPrecondition(text)
    if "invalid argument" in lowered:
        return InvalidArgument(text)
    return Internal(text)
