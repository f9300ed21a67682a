"""User namespaces in the intermediate child, in runc's order (its nsexec):

1. what needs the initial user namespace's privileges is done first: the process's rlimits (a
   hard limit cannot be raised from inside) and its oom_score_adj (nor lowered below its minimum);
   the cgroup's files are opened (they are written later with the opener's credentials);
2. the namespaces given by path are joined, all but the user one: a namespace owned by the
   initial user namespace (the sandbox's pinned UTS and IPC, a network namespace) can no longer
   be joined from inside the container's; one that fails with EPERM is tried again after step 3;
3. the user namespace is joined by path, or unshared: the agent then writes this process's
   uid_map and gid_map (protocol.UserNs, protocol.Mapped), as runc's parent does;
4. the process becomes the container's root (setresuid 0), joins what step 2 left and unshares
   the other new namespaces, which the new user namespace then owns; then it takes gid 0 and
   no supplementary groups (runc's stage-2).

Containers without a user namespace never come here (agent.runtime.child.intermediate).
"""

from __future__ import annotations

import os
import resource
import socket
from typing import Any

from agent import linux
from agent.runtime import protocol
from agent.runtime.child.common import (CgroupTarget, SetupError, new_ns, open_cgroup, receive_cgroup, step,
                                        unshare_flags)
from agent.runtime.child.rootfs import mount_attrs
from agent.runtime.protocol import CreateRequest, Mapped, UserNs


def listed(namespaces: list[list[Any]]) -> bool:
    return any(flag == linux.CLONE_NEWUSER for flag, _ in namespaces)


def privileged_first(proc: dict[str, Any]) -> None:
    """Step 1 for the process ``proc``: its rlimits and oom_score_adj, inherited from here, and
    taken out of ``proc`` (as the container's root the process could not write its own
    /proc/self/oom_score_adj: after setresuid it is not dumpable, so the file is the host root's)."""
    for res, soft, hard in proc["rlimits"]:
        step(f"setrlimit {res}", resource.setrlimit, res, (soft, hard))
    if proc["oom_score_adj"] is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            step("oom_score_adj", f.write, str(proc["oom_score_adj"]))
    proc["rlimits"], proc["oom_score_adj"] = [], None


def enter_for_create(req: CreateRequest, sync: socket.socket) -> CgroupTarget:
    """Steps 1-4 for a container's init, before it is forked; returns its cgroup, opened."""
    cfg = req.config
    privileged_first(cfg["process"])
    opened = [(path, step(f"open namespace {path}", os.open, path, os.O_RDONLY), flag)
              for flag, path in cfg["namespaces"] if path]
    cgroup = req.cgroup if req.cgroup is not None else receive_cgroup(sync)
    target = open_cgroup(cgroup, by_fd=True)
    left = _join(opened, lambda flag: flag != linux.CLONE_NEWUSER, tolerate_eperm=True)
    _premount_mqueue(cfg)
    _enter_user(opened, sync, cfg)
    _join(left, lambda flag: True)
    step("unshare", linux.unshare, unshare_flags(cfg["namespaces"]) & ~linux.CLONE_NEWUSER)
    # runc's init (stage-2) takes gid 0 and no groups once its namespaces are made (a new IPC
    # namespace's mqueue root got the gid of the time: unmapped, nogroup)
    step("setresgid 0 in the user namespace", os.setresgid, 0, 0, 0)
    step("setgroups in the user namespace", os.setgroups, [])
    return target


def join_all(opened: list[tuple[str, int, int]]) -> None:
    """Steps 2-4 for an exec, with the init's namespaces ``opened`` ((name, fd, flag)). Its
    intermediate is root in the initial user namespace, so joining the user namespace last would
    do for every namespace; runc's exec takes the same passes as its create."""
    left = _join(opened, lambda flag: flag != linux.CLONE_NEWUSER, tolerate_eperm=True)
    _enter_user(opened)
    _join(left, lambda flag: True)


def _enter_user(opened: list[tuple[str, int, int]], sync: socket.socket | None = None,
                cfg: dict[str, Any] | None = None) -> None:
    """Step 3: join the user namespace among ``opened``, or (none there) unshare a new one that
    the agent maps on ``sync``; then be root in it, as runc."""
    if any(flag == linux.CLONE_NEWUSER for _, _, flag in opened):
        _join(opened, lambda flag: flag == linux.CLONE_NEWUSER)
        if cfg is not None:
            _check_joined_maps(cfg)
    else:
        step("unshare user", linux.unshare, linux.CLONE_NEWUSER)
        protocol.send(sync, UserNs(os.getpid()))
        reply = protocol.receive(sync)
        if reply is None:
            os._exit(0)  # the agent gave up on this container
        if not isinstance(reply, Mapped):
            raise SetupError(f"spawner protocol: expected Mapped, got {reply!r}")
    # what the set-up makes is the mapped root's
    step("setresuid 0 in the user namespace", os.setresuid, 0, 0, 0)


def _premount_mqueue(cfg: dict[str, Any]) -> None:
    """An mqueue file system belongs to its IPC namespace, and only a process privileged over
    that namespace's owner may mount it. A container that shares an IPC namespace made outside
    its user namespace (the sandbox's, the agent's) gets its mqueue mounted here, detached, before
    the user namespace; its init attaches it (agent.runtime.child.rootfs, ``fd``)."""
    if new_ns(cfg["namespaces"], linux.CLONE_NEWIPC):
        return
    for m in cfg["mounts"]:
        if m["type"] == "mqueue":
            m["fd"] = step(f"mount {m['destination']}", linux.fsmount_new, "mqueue", mount_attrs(m["flags"])[0])


def _join(opened: list[tuple[str, int, int]], which, tolerate_eperm: bool = False) -> list[tuple[str, int, int]]:
    """setns into each of ``opened`` that ``which(flag)`` selects; those refused with EPERM are
    returned when ``tolerate_eperm``."""
    refused = []
    for name, fd, flag in opened:
        if not which(flag):
            continue
        try:
            linux.setns(fd, flag)
        except PermissionError as exc:
            if not tolerate_eperm:
                raise SetupError(f"setns {name}: {exc.strerror}") from None
            refused.append((name, fd, flag))
            continue
        except OSError as exc:
            raise SetupError(f"setns {name}: {exc.strerror}") from None
        os.close(fd)
    return refused


def _check_joined_maps(cfg: dict[str, Any]) -> None:
    """Mappings given with a user namespace joined by path must be that namespace's (as runc)."""
    for name, key in (("uid_map", "uid_mappings"), ("gid_map", "gid_mappings")):
        wanted = cfg.get(key) or []
        if not wanted:
            continue
        with open(f"/proc/self/{name}") as f:
            actual = sorted(tuple(int(x) for x in line.split()) for line in f if line.strip())
        if actual != sorted(tuple(m) for m in wanted):
            raise SetupError(f"invalid argument: the user namespace joined has another {name} than "
                             f"OCI.Linux.{'UID' if key[0] == 'u' else 'GID'}Mappings")
