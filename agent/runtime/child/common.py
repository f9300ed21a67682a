"""What the spawner's children share: failing with a report, set-up steps, namespaces and the
cgroup a new process joins."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, NoReturn

from agent import linux
from agent.runtime import protocol
from agent.runtime.protocol import Cgroup


class SetupError(Exception):
    """A step of the container set-up failed; the message says which."""


def fail(sync: socket.socket, message: str, code: int = 1) -> NoReturn:
    protocol.send(sync, protocol.Failed(message))
    os._exit(code)


def step(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        raise SetupError(f"{what}: {exc.strerror or exc}") from None


# --- namespaces ---------------------------------------------------------------------------------
# A container config's ``namespaces``: [clone flag, path]; an empty path creates a new namespace.

def join_paths(namespaces: list[list[Any]]) -> None:
    for flag, path in namespaces:
        if path:
            fd = step(f"open namespace {path}", os.open, path, os.O_RDONLY)
            step(f"setns {path}", linux.setns, fd, flag)
            os.close(fd)


def unshare_flags(namespaces: list[list[Any]]) -> int:
    """The namespaces to create (the cgroup one is made by the init, once in its cgroup)."""
    flags = 0
    for flag, path in namespaces:
        if not path and flag != linux.CLONE_NEWCGROUP:
            flags |= flag
    return flags


def new_ns(namespaces: list[list[Any]], flag: int) -> bool:
    return any(f == flag and not p for f, p in namespaces)


# --- the cgroup ---------------------------------------------------------------------------------

def receive_cgroup(sync: socket.socket) -> Cgroup:
    """The cgroup the agent made meanwhile; EOF means it gave up (its undo removed what it made)."""
    msg = protocol.receive(sync)
    if msg is None:
        os._exit(0)
    if not isinstance(msg, Cgroup):
        raise SetupError(f"spawner protocol: expected the cgroup, got {msg!r}")
    return msg


class CgroupTarget:
    """Open fds of a container's cgroup: the v2 directory (or -1) and the v1 ``tasks`` files."""

    def __init__(self, v2_dir: int, v2_procs: str, v1_tasks: list[tuple[str, int]]) -> None:
        self.v2_dir, self.v2_procs, self.v1_tasks = v2_dir, v2_procs, v1_tasks
        self.forked_into_v2 = False
        self.v2_procs_fd = -1  # opened in advance: written instead of clone3 (see open_cgroup)


def open_cgroup(cgroup: Cgroup, by_fd: bool = False) -> CgroupTarget:
    """``by_fd``: the child joins through files opened now, for a process that is about to enter
    a user namespace. A write checks the opener's credentials; clone3's CLONE_INTO_CGROUP and a
    later open check the caller's, which are then the container root's."""
    v2 = cgroup.v2
    v2_dir = step(f"join cgroup {v2}", os.open, v2, os.O_RDONLY | os.O_DIRECTORY) if v2 else -1
    tasks = [(d, step(f"join cgroup {d}", os.open, os.path.join(d, "tasks"), os.O_WRONLY))
             for d in cgroup.v1]
    target = CgroupTarget(v2_dir, os.path.join(v2, "cgroup.procs") if v2 else "", tasks)
    if by_fd and v2:
        target.v2_procs_fd = step(f"join cgroup {v2}", os.open, target.v2_procs, os.O_WRONLY)
    return target


def enter_cgroup(target: CgroupTarget) -> None:
    """In the (single-threaded) child: join the v1 hierarchies, and v2 if clone3 could not.

    A task that moves itself by writing "0" to a v1 ``tasks`` file migrates one thread and
    skips the global threadgroup lock, whose write side waits for an RCU grace period.
    """
    for d, fd in target.v1_tasks:
        step(f"join cgroup {d}", os.write, fd, b"0")
        os.close(fd)
    if target.v2_dir >= 0:
        if target.v2_procs_fd >= 0:
            step(f"join cgroup {target.v2_procs}", os.write, target.v2_procs_fd, b"0")
            os.close(target.v2_procs_fd)
        elif not target.forked_into_v2:
            with open(target.v2_procs, "w") as f:
                step(f"join cgroup {target.v2_procs}", f.write, "0")
        os.close(target.v2_dir)
