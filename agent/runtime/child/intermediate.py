"""The intermediate child of a request: it joins what it must, forks the process that does the
work, reports that process's pid (protocol.Pid) and exits, so the process is re-parented to the
agent and reaped there."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from agent import linux
from agent.runtime import protocol
from agent.runtime.child.common import (CgroupTarget, SetupError, enter_cgroup, fail, join_paths,
                                        open_cgroup, receive_cgroup, step, unshare_flags)
from agent.runtime.child import userns
from agent.runtime.child.container_init import container_init
from agent.runtime.child.process import exec_process
from agent.runtime.protocol import CreateRequest, ExecRequest, Pid

NS_ORDER = [("user", linux.CLONE_NEWUSER), ("cgroup", linux.CLONE_NEWCGROUP), ("ipc", linux.CLONE_NEWIPC),
            ("uts", linux.CLONE_NEWUTS), ("net", linux.CLONE_NEWNET), ("pid", linux.CLONE_NEWPID),
            ("mnt", linux.CLONE_NEWNS)]


def spawn_container(req: CreateRequest, sync: socket.socket, stdio: list[int]) -> NoReturn:
    """CreateContainer: join, unshare, fork the init, report its pid.

    The init starts in its cgroup without a migration by the agent (see ``_fork_into``), so
    no RCU grace period is paid: a v1 ``cgroup.procs`` write costs ~14 ms here.
    """
    cfg = req.config
    try:
        if userns.listed(cfg["namespaces"]):
            target = userns.enter_for_create(req, sync)
        else:
            join_paths(cfg["namespaces"])
            step("unshare", linux.unshare, unshare_flags(cfg["namespaces"]))
            # the agent creates the cgroup meanwhile, and sends it next
            cgroup = req.cgroup if req.cgroup is not None else receive_cgroup(sync)
            # Opened before the fork: the init's pivot_root changes this process's root too.
            target = open_cgroup(cgroup)
        reported_r, reported_w = os.pipe()  # EOF: the agent has the init's pid
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))
    pid = _fork_joined(sync, target)
    if pid == 0:
        os.close(reported_w)
        container_init(cfg, sync, stdio, reported_r, lambda: None)
    protocol.send(sync, Pid(pid))
    os.close(reported_w)
    os._exit(0)


def spawn_exec(req: ExecRequest, sync: socket.socket, stdio: list[int]) -> NoReturn:
    """ExecProcess: join the init's namespaces, cgroup and root, fork the process."""
    init = req.init_pid
    try:
        root = step("open the container's root", os.open, f"/proc/{init}/root", os.O_DIRECTORY | os.O_RDONLY)
        ns_fds = _open_namespaces(init)
        in_userns = any(flag == linux.CLONE_NEWUSER for _, _, flag in ns_fds)
        target = open_cgroup(req.cgroup, by_fd=in_userns)
        if in_userns:  # the container's own user namespace: joined last, as runc's exec
            userns.privileged_first(req.process)
            userns.join_all(ns_fds)
        else:
            for name, fd, flag in ns_fds:
                step(f"setns {name}", linux.setns, fd, flag)
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))
    pid = _fork_joined(sync, target)
    if pid == 0:
        try:
            step("enter the container's root", os.fchdir, root)
            step("chroot", os.chroot, ".")
            os.close(root)
            exec_process(req.process, sync, stdio, wait_start=False, seccomp_cfg=req.seccomp)
        except (OSError, SetupError) as exc:
            fail(sync, str(exc))
    protocol.send(sync, Pid(pid))
    os._exit(0)


def spawn_task(fn: Callable[..., Any], args: dict[str, Any], sync: socket.socket, fds: list[int]) -> NoReturn:
    """A spawner task: fork the worker and exit. The worker reports its own pid before anything
    else, so the caller reads the pid first whichever process the scheduler runs first (the
    intermediate reporting it raced the worker's reply)."""
    if os.fork() == 0:
        code = 0
        try:
            protocol.send(sync, Pid(os.getpid()))  # the spawner's PID namespace: the agent's
            fn(args, fds, lambda data: protocol.send(sync, protocol.Reply(data)))
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            protocol.send(sync, protocol.Failed(f"{type(exc).__name__}: {exc}"))
            code = 1
        os._exit(code)
    os._exit(0)


def _fork_joined(sync: socket.socket, target: CgroupTarget) -> int:
    """Fork a child that is in the cgroup ``target``; a failure is reported and ends the process."""
    try:
        pid = _fork_into(target)
        if pid == 0:
            enter_cgroup(target)
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))
    return pid


def _fork_into(target: CgroupTarget) -> int:
    """Fork; on cgroup v2 the child is born in its cgroup (clone3 CLONE_INTO_CGROUP)."""
    if target.v2_dir >= 0 and target.v2_procs_fd < 0:
        try:
            pid = linux.fork_into_cgroup(target.v2_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.E2BIG, errno.EINVAL):
                raise SetupError(f"clone3 into {target.v2_procs}: {exc.strerror}") from None
        else:
            target.forked_into_v2 = True
            return pid
    return os.fork()


def _open_namespaces(pid: int) -> list[tuple[str, int, int]]:
    """Fds of the namespaces of ``pid`` that differ from ours, in joining order."""
    out = []
    for name, flag in NS_ORDER:
        theirs = f"/proc/{pid}/ns/{name}"
        try:
            if os.stat(theirs).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                continue
        except FileNotFoundError:
            continue
        out.append((name, step(f"open {theirs}", os.open, theirs, os.O_RDONLY), flag))
    return out
