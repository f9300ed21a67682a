"""The container's init: set up in its namespaces and rootfs, it reports protocol.Ready and
waits for protocol.Start, then becomes the container's process (agent.runtime.child.process)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from agent import linux
from agent.runtime import protocol
from agent.runtime.child import rootfs
from agent.runtime.child.common import (SetupError, enter_cgroup, fail, join_paths, new_ns,
                                        open_cgroup, receive_cgroup, step, unshare_flags)
from agent.runtime.child.process import exec_process, setup_stdio
from agent.runtime.protocol import CreateRequest, Pid


def init_container(req: CreateRequest, sync: socket.socket, stdio: list[int],
                   premade: dict[int, int] | None = None) -> NoReturn:
    """A CreateContainer taken by a zygote born as PID 1 of a new PID namespace and as the
    agent's child (agent.runtime.spawner): it becomes the container's init itself. No fork while
    the client waits, and none of the intermediate's copy-on-write faults. It joins its cgroup
    in the course of the rootfs set-up (see ``container_init``), while the agent makes it.

    ``premade``: the namespaces the zygote made while it waited (``premake_namespaces``).
    It moves itself into the cgroup (see ``enter_cgroup``); the agent sends a container with a
    v2 cgroup this way only where cgroup2 favors dynamic changes (Runtime._init_is_zygote).
    """
    cfg = req.config
    try:
        protocol.send(sync, Pid(int(os.readlink("/proc/self"))))  # /proc is still the agent's
        join_paths(cfg["namespaces"])
        flags = _settle_premade(cfg, premade or {})
        step("unshare", linux.unshare, flags & ~linux.CLONE_NEWPID)
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))

    def join_cgroup() -> None:  # the agent makes the cgroup while the rootfs is set up
        enter_cgroup(open_cgroup(req.cgroup if req.cgroup is not None else receive_cgroup(sync)))

    container_init(cfg, sync, stdio, -1, join_cgroup)


# Made by a PID 1 zygote while it waits for a request. A network namespace takes about 0.5 ms
# to create here, and a fresh one holds only a loopback device that is down: one made early is
# as new as one made on request. Not so a mount namespace (a copy of the mount table of its
# time, without the rootfs mounted since) or a UTS one (a copy of the hostname).
PREMADE = (("net", linux.CLONE_NEWNET),)


def premake_namespaces() -> dict[int, int]:
    """Enter new PREMADE namespaces; returns {flag: fd of the namespace left}, for a container
    that shares it. What cannot be made here is left to the request."""
    left = {}
    for name, flag in PREMADE:
        try:
            fd = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            linux.unshare(flag)
        except OSError:
            os.close(fd)
            continue
        left[flag] = fd
    return left


def _settle_premade(cfg: dict[str, Any], premade: dict[int, int]) -> int:
    """Use or leave the premade namespaces (after ``join_paths``); the flags still to unshare.

    A namespace the spec asks new is the premade one; one given by path was joined already; one
    not listed is shared with the agent, so the zygote goes back to the namespace it left.
    """
    flags = unshare_flags(cfg["namespaces"])
    listed = {flag for flag, _ in cfg["namespaces"]}
    for flag, left in premade.items():
        try:
            if flag not in listed:
                step("setns back to the agent's namespace", linux.setns, left, flag)
        finally:
            os.close(left)
        flags &= ~flag
    return flags


def container_init(cfg: dict[str, Any], sync: socket.socket, stdio: list[int], reported: int,
                   join_cgroup: Callable[[], None]) -> NoReturn:
    """Set up the container and wait for the start; ``join_cgroup`` moves this process into the
    container's cgroup if it is not there yet.

    The cgroup is joined (and the cgroup namespace made) as late as the set-up allows: before
    the first cgroup mount or device node, both of which depend on it, and before pivot_root at
    the latest. Mounts before that point are made while the agent still makes the cgroup.
    """
    joined = False

    def join() -> None:
        nonlocal joined
        if not joined:
            joined = True
            join_cgroup()
            if new_ns(cfg["namespaces"], linux.CLONE_NEWCGROUP):
                step("unshare cgroup", linux.unshare, linux.CLONE_NEWCGROUP)

    try:
        os.umask(0)
        proc = cfg["process"]
        setup_stdio(stdio, proc["terminal"], sync, keep=(reported, *(m["fd"] for m in cfg["mounts"] if "fd" in m)))
        rootfs.prepare(cfg, proc["terminal"], join)
        join()
        rootfs.pivot(cfg["rootfs"])
        rootfs.finish(cfg)
        if cfg["hostname"] and new_ns(cfg["namespaces"], linux.CLONE_NEWUTS):
            step("sethostname", linux.sethostname, cfg["hostname"])
        exec_process(proc, sync, stdio=None, wait_start=True, reported=reported, seccomp_cfg=cfg.get("seccomp"))
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))
