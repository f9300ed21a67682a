"""containerd.task.v2.Task for one task: its VM, its init process and its execs.

Every method of the service is in the table (``TaskService.dispatch``); one not served here
answers UNIMPLEMENTED. Errors are ttrpc statuses with the codes containerd maps to its errdefs
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT); a failed Create undoes what it
did (agent calls, VM, mounts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import empty_pb2, message_factory, timestamp_pb2
from google.protobuf.message import DecodeError

from agent import ttrpc
from agent.errors import Code
from agent.protocols import agent_pb2, oci_pb2
from kata_agent_client.shim import TASK_SERVICE, VERSION
from kata_agent_client.shim.events import Publisher, now
from kata_agent_client.shim.protocols import ctd_cgroups_v1_pb2 as cgv1
from kata_agent_client.shim.protocols import ctd_events_pb2 as ev
from kata_agent_client.shim.protocols import ctd_shim_pb2 as pb
from kata_agent_client.shim.protocols import ctd_task_types_pb2 as types
from kata_agent_client.shim.sandbox import Sandbox
from kata_agent_client.shim.stdio import ProcessIO, UnsupportedIO
from kata_agent_client.spec import SpecError, message_from_json, shared_storage, spec_from_config

log = logging.getLogger(__name__)

AGENT = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
_REPLIES = {m.name: message_factory.GetMessageClass(m.output_type) for m in AGENT.methods}
TASK = pb.DESCRIPTOR.services_by_name["Task"]
DRAIN_IDLE = 2.0  # output open this long after the exit with no data: given up (a left-behind child holds it)


def error(code: Code, message: str) -> ttrpc.Status:
    return ttrpc.Status(code, message)


@dataclass
class Process:
    exec_id: str                      # "" for the init process
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False
    spec: object = None               # an exec's oci Process
    status: int = types.CREATED
    exit_status: int = 0
    exited_at: timestamp_pb2.Timestamp | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    io: ProcessIO | None = None
    waiter: asyncio.Task | None = None


class TaskService:
    def __init__(self, task_id: str, namespace: str, run_dir: Path, publisher: Publisher) -> None:
        self.id = task_id
        self.namespace = namespace
        self.publisher = publisher
        self.sandbox = Sandbox(task_id, run_dir)
        self.agent: ttrpc.AsyncClient | None = None
        self.bundle = ""
        self.init: Process | None = None
        self.execs: dict[str, Process] = {}
        self.deleted = False
        self.oom_watch: asyncio.Task | None = None
        self.shutdown = asyncio.Event()
        self.marks: dict[str, float] = {}  # what happened when (time.monotonic()), for bench/containerd.py
        self.lock = asyncio.Lock()
        handlers = {m.name: getattr(self, m.name, None) for m in TASK.methods}
        self.methods = {m.name: (message_factory.GetMessageClass(m.input_type), handlers[m.name])
                        for m in TASK.methods}

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def timeline(self) -> dict:
        """The marks and the VM's phases, in seconds since Create came."""
        t0 = self.marks.get("create", 0.0)
        out = {name: round(t - t0, 4) for name, t in self.marks.items()}
        out.update({f"vm: {k}": round(v, 4) for k, v in self.sandbox.phases.items()})
        return out

    # ------------------------------------------------------------------ ttrpc entry
    async def dispatch(self, service: str, method: str, body: bytes, deadline) -> bytes:
        if service != TASK_SERVICE or method not in self.methods:
            raise error(Code.UNIMPLEMENTED, f"{service}/{method} is not served by this shim")
        request_cls, handler = self.methods[method]
        if handler is None:
            raise error(Code.UNIMPLEMENTED, f"{method} is not implemented by {TASK_SERVICE} here")
        try:
            request = request_cls.FromString(body)
        except DecodeError as exc:
            raise error(Code.INVALID_ARGUMENT, f"{method}: not a valid {request_cls.DESCRIPTOR.full_name}: {exc}")
        log.debug("%s %s", method, request)
        return (await handler(request)).SerializeToString()

    async def call(self, method: str, request, timeout: float | None = None):
        """One agent call; its failure comes back as the agent's ttrpc status."""
        if self.agent is None:
            raise error(Code.FAILED_PRECONDITION, f"{method}: the task's VM is not running")
        payload = await self.agent.call("grpc.AgentService", method, request.SerializeToString(), timeout=timeout)
        return _REPLIES[method].FromString(payload)

    # ------------------------------------------------------------------ lookups
    def _check_id(self, task_id: str) -> None:
        if task_id != self.id:
            raise error(Code.NOT_FOUND, f"task {task_id!r}: this shim serves {self.id!r}")

    def process(self, task_id: str, exec_id: str = "") -> Process:
        self._check_id(task_id)
        if self.init is None or self.deleted:
            raise error(Code.NOT_FOUND, f"task {task_id!r} does not exist")
        if not exec_id:
            return self.init
        proc = self.execs.get(exec_id)
        if proc is None:
            raise error(Code.NOT_FOUND, f"exec {exec_id!r} of task {task_id!r} does not exist")
        return proc

    def pid(self, proc: Process | None = None) -> int:
        return self.sandbox.pid

    # ------------------------------------------------------------------ Create
    async def Create(self, req: pb.CreateTaskRequest) -> pb.CreateTaskResponse:
        async with self.lock:
            if req.id != self.id:
                raise error(Code.INVALID_ARGUMENT, f"task {req.id!r}: this shim was started for {self.id!r} "
                                                   f"(one task per shim)")
            if self.init is not None:
                raise error(Code.ALREADY_EXISTS, f"task {req.id!r} already exists")
            if req.checkpoint or req.parent_checkpoint:
                raise error(Code.UNIMPLEMENTED, "restoring from a checkpoint is not supported")
            config = self._read_config(Path(req.bundle))
            spec = self._guest_spec(config, Path(req.bundle))  # a bad config costs no VM boot
            self.mark("create")
            proc = Process("", req.stdin, req.stdout, req.stderr, req.terminal)
            try:
                proc.io = ProcessIO(self.call, self.id, "", stdin=req.stdin, stdout=req.stdout,
                                    stderr=req.stderr, terminal=req.terminal)
            except UnsupportedIO as exc:
                raise error(Code.INVALID_ARGUMENT, str(exc))
            self.bundle = req.bundle
            try:
                await asyncio.to_thread(self.sandbox.start, list(req.rootfs), Path(req.bundle))
            except Exception as exc:  # noqa: BLE001 - reported to containerd, all undone by start
                log.exception("starting the VM")
                raise error(Code.UNAVAILABLE, f"starting the task's VM: {exc}")
            try:
                self.mark("vm ready")
                await self._connect()
                await self.call("CreateSandbox", agent_pb2.CreateSandboxRequest(
                    hostname=config.get("hostname", ""), sandbox_id=self.id,
                    storages=[shared_storage()]),
                    timeout=60)
                self.mark("sandbox created")
                await self.call("CreateContainer", agent_pb2.CreateContainerRequest(
                    container_id=self.id, exec_id=self.id, OCI=spec), timeout=60)
                self.mark("container created")
            except BaseException as exc:  # any failure, a cancel too: the VM and the mount go
                await self._teardown()
                if isinstance(exc, ttrpc.Status):
                    raise error(exc.code, f"creating the container in the VM: {exc.message}")
                if isinstance(exc, (OSError, ValueError)):
                    raise error(Code.INVALID_ARGUMENT if isinstance(exc, ValueError) else Code.UNAVAILABLE,
                                f"creating the container in the VM: {exc}")
                raise
            self.init = proc
            proc.io.start()
            self.publisher.publish(ev.TaskCreate(
                container_id=self.id, bundle=req.bundle, rootfs=req.rootfs, checkpoint=req.checkpoint,
                io=ev.TaskIO(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
                pid=self.pid()))
            log.info("created %s: pid %d, %s", self.id, self.pid(),
                     {k: round(v, 3) for k, v in self.sandbox.phases.items()})
            return pb.CreateTaskResponse(pid=self.pid())

    @staticmethod
    def _read_config(bundle: Path) -> dict:
        try:
            config = json.loads((bundle / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise error(Code.INVALID_ARGUMENT, f"{bundle}/config.json: {exc}")
        if not isinstance(config, dict) or not isinstance(config.get("process"), dict):
            raise error(Code.INVALID_ARGUMENT, f"{bundle}/config.json: no process to run")
        return config

    def _guest_spec(self, config: dict, bundle: Path):
        """The OCI spec CreateContainer sends, from config.json as the guest runs it; a config
        that cannot run there is INVALID_ARGUMENT, before any VM is started."""
        try:
            return spec_from_config(self._guest_config(config))
        except (ValueError, TypeError, AttributeError) as exc:  # SpecError is a ValueError
            raise error(Code.INVALID_ARGUMENT, f"{bundle}/config.json: {exc}")

    def _guest_config(self, config: dict) -> dict:
        """containerd's spec as the guest runs it: the rootfs where virtio-fs puts it; host paths
        it cannot reach refused rather than silently dropped."""
        config = json.loads(json.dumps(config))
        config.setdefault("root", {})["path"] = self.sandbox.guest_root()
        for m in config.get("mounts") or []:
            if m.get("type") == "bind" or "bind" in (m.get("options") or []) or "rbind" in (m.get("options") or []):
                raise ValueError(f"mount {m.get('destination')}: bind mounts of host paths are not "
                                 f"shared into the VM (source {m.get('source')})")
        linux = config.get("linux") or {}
        for ns in linux.get("namespaces") or []:
            if ns.get("path"):
                raise ValueError(f"{ns.get('type')} namespace {ns['path']}: a host namespace cannot be "
                                 f"joined from the VM")
        return config

    async def _connect(self) -> None:
        from agent.config import parse_address
        from kata_agent_client.dial import dial

        sock = await asyncio.to_thread(dial, parse_address(self.sandbox.addr), 10)
        self.agent = await ttrpc.AsyncClient.connect(sock)

    async def _teardown(self) -> None:
        """Stop everything of the task: its IO, the agent connection, the VM, the mounts."""
        for proc in [self.init, *self.execs.values()]:
            if proc is not None and proc.io is not None:
                proc.io.cancel()
        if self.oom_watch is not None:
            self.oom_watch.cancel()
        if self.agent is not None:
            self.agent.close()
            self.agent = None
        problems = await asyncio.to_thread(self.sandbox.stop)
        for p in problems:
            log.error("clean-up: %s", p)

    # ------------------------------------------------------------------ Start / Wait / State
    async def Start(self, req: pb.StartRequest) -> pb.StartResponse:
        proc = self.process(req.id, req.exec_id)
        if proc.status != types.CREATED:
            raise error(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id!r} was started already")
        if req.exec_id:
            await self.call("ExecProcess", agent_pb2.ExecProcessRequest(
                container_id=self.id, exec_id=req.exec_id, process=proc.spec), timeout=60)
            proc.io.start()
        else:
            self.mark("start")
            await self.call("StartContainer", agent_pb2.StartContainerRequest(container_id=self.id), timeout=60)
            self.mark("started")
        proc.status = types.RUNNING
        proc.waiter = asyncio.get_running_loop().create_task(self._wait_exit(proc))
        if req.exec_id:
            self.publisher.publish(ev.TaskExecStarted(container_id=self.id, exec_id=req.exec_id, pid=self.pid()))
        else:
            self.publisher.publish(ev.TaskStart(container_id=self.id, pid=self.pid()))
            self.oom_watch = asyncio.get_running_loop().create_task(self._watch_oom())
        return pb.StartResponse(pid=self.pid())

    async def _watch_oom(self) -> None:
        """The agent's OOM events (GetOOMEvent waits for the next) as TaskOOM."""
        while self.agent is not None:
            try:
                reply = await self.call("GetOOMEvent", agent_pb2.GetOOMEventRequest())
            except ttrpc.Status as exc:
                if exc.code == Code.UNIMPLEMENTED or isinstance(exc, ttrpc.ConnectionClosed):
                    return
                log.debug("GetOOMEvent: %s", exc)
                await asyncio.sleep(1)
                continue
            self.publisher.publish(ev.TaskOOM(container_id=reply.container_id or self.id))

    async def _wait_exit(self, proc: Process) -> None:
        try:
            reply = await self.call("WaitProcess", agent_pb2.WaitProcessRequest(
                container_id=self.id, exec_id=proc.exec_id))
            status = reply.status
        except ttrpc.Status as exc:
            log.error("WaitProcess %r: %s", proc.exec_id, exc)
            status = 128 + signal.SIGKILL
        if not proc.exec_id:
            self.mark("exited")
        if proc.io is not None:
            await proc.io.drain(DRAIN_IDLE)
        if not proc.exec_id:
            self.mark("output drained")
        self._exited(proc, status)

    def _exited(self, proc: Process, status: int) -> None:
        if proc.exited.is_set():
            return
        proc.status = types.STOPPED
        proc.exit_status = status & 0xFFFFFFFF
        proc.exited_at = now()
        proc.exited.set()
        self.publisher.publish(ev.TaskExit(container_id=self.id, id=proc.exec_id or self.id, pid=self.pid(),
                                           exit_status=proc.exit_status, exited_at=proc.exited_at))

    async def Wait(self, req: pb.WaitRequest) -> pb.WaitResponse:
        proc = self.process(req.id, req.exec_id)
        await proc.exited.wait()
        return pb.WaitResponse(exit_status=proc.exit_status, exited_at=proc.exited_at)

    async def State(self, req: pb.StateRequest) -> pb.StateResponse:
        proc = self.process(req.id, req.exec_id)
        reply = pb.StateResponse(id=self.id, bundle=self.bundle, pid=self.pid(proc), status=proc.status,
                                 stdin=proc.stdin, stdout=proc.stdout, stderr=proc.stderr,
                                 terminal=proc.terminal, exit_status=proc.exit_status, exec_id=proc.exec_id)
        if proc.exited_at is not None:
            reply.exited_at.CopyFrom(proc.exited_at)
        return reply

    # ------------------------------------------------------------------ Kill / Delete
    async def Kill(self, req: pb.KillRequest) -> empty_pb2.Empty:
        proc = self.process(req.id, req.exec_id)
        if proc.exited.is_set():
            raise error(Code.NOT_FOUND, f"process {req.exec_id or req.id!r}: already finished")
        if not 0 < req.signal < 65:
            raise error(Code.INVALID_ARGUMENT, f"signal {req.signal} out of range")
        if proc.exec_id and proc.status == types.CREATED:  # the agent has not heard of it yet
            self._exited(proc, 128 + req.signal)
            return empty_pb2.Empty()
        await self.call("SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=self.id, exec_id=proc.exec_id, signal=req.signal), timeout=30)
        if proc.status == types.CREATED and req.signal == signal.SIGKILL:
            self._exited(proc, 128 + signal.SIGKILL)  # never started: no waiter will report it
        return empty_pb2.Empty()

    async def Delete(self, req: pb.DeleteRequest) -> pb.DeleteResponse:
        proc = self.process(req.id, req.exec_id)
        if proc.status not in (types.STOPPED, types.CREATED):
            raise error(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id!r} is running: kill it first")
        if req.exec_id:
            del self.execs[req.exec_id]
        else:
            if proc.status == types.CREATED:
                self._exited(proc, 0)
            self.mark("delete")
            try:
                await self.call("RemoveContainer", agent_pb2.RemoveContainerRequest(
                    container_id=self.id, timeout=10), timeout=30)
                await self.call("DestroySandbox", agent_pb2.DestroySandboxRequest(), timeout=30)
            except ttrpc.Status as exc:
                log.warning("removing the container from the VM: %s", exc)
            self.mark("container removed")
            await self._teardown()
            self.mark("vm stopped")
            self.deleted = True
        exited_at = proc.exited_at or now()
        self.publisher.publish(ev.TaskDelete(container_id=self.id, id=proc.exec_id or self.id, pid=self.pid(proc),
                                             exit_status=proc.exit_status, exited_at=exited_at))
        return pb.DeleteResponse(pid=self.pid(proc), exit_status=proc.exit_status, exited_at=exited_at)

    # ------------------------------------------------------------------ Exec and the rest
    async def Exec(self, req: pb.ExecProcessRequest) -> empty_pb2.Empty:
        init = self.process(req.id)
        if not req.exec_id:
            raise error(Code.INVALID_ARGUMENT, "Exec: an exec id is required")
        if req.exec_id in self.execs:
            raise error(Code.ALREADY_EXISTS, f"exec {req.exec_id!r} already exists")
        if init.status not in (types.RUNNING, types.PAUSED):
            raise error(Code.FAILED_PRECONDITION, f"task {self.id!r} is not running")
        try:
            process = json.loads(req.spec.value or b"{}")
            spec = message_from_json(oci_pb2.Process, process, "process")
            io = ProcessIO(self.call, self.id, req.exec_id, stdin=req.stdin, stdout=req.stdout,
                           stderr=req.stderr, terminal=req.terminal)
        except (ValueError, SpecError, UnsupportedIO) as exc:
            raise error(Code.INVALID_ARGUMENT, f"Exec {req.exec_id!r}: {exc}")
        if not spec.Args:
            raise error(Code.INVALID_ARGUMENT, f"Exec {req.exec_id!r}: the process has no args")
        self.execs[req.exec_id] = Process(req.exec_id, req.stdin, req.stdout, req.stderr, req.terminal,
                                          spec=spec, io=io)
        self.publisher.publish(ev.TaskExecAdded(container_id=self.id, exec_id=req.exec_id))
        return empty_pb2.Empty()

    async def Pids(self, req: pb.PidsRequest) -> pb.PidsResponse:
        """The VM's QEMU, as Kata answers: the container's processes are in the guest."""
        self.process(req.id)
        return pb.PidsResponse(processes=[types.ProcessInfo(pid=self.pid())])

    async def Pause(self, req: pb.PauseRequest) -> empty_pb2.Empty:
        proc = self.process(req.id)
        if proc.status != types.RUNNING:
            raise error(Code.FAILED_PRECONDITION, f"task {self.id!r} is not running")
        await self.call("PauseContainer", agent_pb2.PauseContainerRequest(container_id=self.id), timeout=30)
        proc.status = types.PAUSED
        self.publisher.publish(ev.TaskPaused(container_id=self.id))
        return empty_pb2.Empty()

    async def Resume(self, req: pb.ResumeRequest) -> empty_pb2.Empty:
        proc = self.process(req.id)
        if proc.status != types.PAUSED:
            raise error(Code.FAILED_PRECONDITION, f"task {self.id!r} is not paused")
        await self.call("ResumeContainer", agent_pb2.ResumeContainerRequest(container_id=self.id), timeout=30)
        if proc.status == types.PAUSED:
            proc.status = types.RUNNING
        self.publisher.publish(ev.TaskResumed(container_id=self.id))
        return empty_pb2.Empty()

    async def Stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        self.process(req.id)
        reply = await self.call("StatsContainer", agent_pb2.StatsContainerRequest(container_id=self.id),
                                timeout=30)
        stats = reply.cgroup_stats
        cpu, mem = stats.cpu_stats.cpu_usage, stats.memory_stats
        metrics = cgv1.Metrics(
            pids=cgv1.PidsStat(current=stats.pids_stats.current, limit=stats.pids_stats.limit),
            cpu=cgv1.CPUStat(
                usage=cgv1.CPUUsage(total=cpu.total_usage, kernel=cpu.usage_in_kernelmode,
                                    user=cpu.usage_in_usermode, per_cpu=cpu.percpu_usage),
                throttling=cgv1.Throttle(periods=stats.cpu_stats.throttling_data.periods,
                                         throttled_periods=stats.cpu_stats.throttling_data.throttled_periods,
                                         throttled_time=stats.cpu_stats.throttling_data.throttled_time)),
            memory=cgv1.MemoryStat(
                cache=mem.cache, rss=mem.stats.get("rss", mem.stats.get("anon", 0)),
                usage=_entry(mem.usage), swap=_entry(mem.swap_usage), kernel=_entry(mem.kernel_usage)))
        out = pb.StatsResponse()
        out.stats.type_url = metrics.DESCRIPTOR.full_name  # containerd's typeurl: the bare name
        out.stats.value = metrics.SerializeToString()
        return out

    async def ResizePty(self, req: pb.ResizePtyRequest) -> empty_pb2.Empty:
        proc = self.process(req.id, req.exec_id)
        if not proc.terminal:
            raise error(Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id!r} has no terminal")
        await self.call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
            container_id=self.id, exec_id=proc.exec_id, row=req.height, column=req.width), timeout=30)
        return empty_pb2.Empty()

    async def CloseIO(self, req: pb.CloseIORequest) -> empty_pb2.Empty:
        proc = self.process(req.id, req.exec_id)
        if req.stdin and proc.io is not None:
            await proc.io.close_stdin()
        return empty_pb2.Empty()

    async def Update(self, req: pb.UpdateTaskRequest) -> empty_pb2.Empty:
        self.process(req.id)
        try:
            resources = message_from_json(oci_pb2.LinuxResources, json.loads(req.resources.value or b"{}"),
                                          "resources")
        except (ValueError, SpecError) as exc:
            raise error(Code.INVALID_ARGUMENT, f"Update: {exc}")
        await self.call("UpdateContainer", agent_pb2.UpdateContainerRequest(
            container_id=self.id, resources=resources), timeout=30)
        return empty_pb2.Empty()

    # ------------------------------------------------------------------ Connect / Shutdown
    async def Connect(self, req: pb.ConnectRequest) -> pb.ConnectResponse:
        self._check_id(req.id)
        return pb.ConnectResponse(shim_pid=os.getpid(), task_pid=self.pid(), version=VERSION)

    async def Shutdown(self, req: pb.ShutdownRequest) -> empty_pb2.Empty:
        self._check_id(req.id)
        if self.init is not None and not self.deleted and not req.now:
            return empty_pb2.Empty()  # the task is still there: containerd will delete it first
        self.shutdown.set()
        return empty_pb2.Empty()

    async def close(self) -> None:
        """At exit: whatever is still up goes."""
        if not self.deleted:
            await self._teardown()


def _entry(data) -> cgv1.MemoryEntry:
    return cgv1.MemoryEntry(limit=data.limit, usage=data.usage, max=data.max_usage, failcnt=data.failcnt)
