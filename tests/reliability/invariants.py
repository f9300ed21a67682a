"""Snapshots of what an agent may not leak or change, and their comparison.

``AgentState`` is read from /proc/<pid>: the agent's mounts, fds, threads, children, zombies, RSS.
``MachineState`` is what the machine shows outside the agent's namespaces: our own mountinfo, the
/etc tree, hostname, network links and routes. ``cgroup_tree(roots)`` lists the cgroup directories
below the given roots. ``diff`` says what changed, in words a failure message can show.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def mounts(pid: int | str = "self") -> Counter:
    """Mount points as (mount point, fs type, root within the fs, source): ids left out."""
    out: Counter = Counter()
    for line in _read(f"/proc/{pid}/mountinfo").splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        r = right.split()
        out[(f[4], r[0], f[3], r[1] if len(r) > 1 else "")] += 1
    return out


def children(pid: int) -> list[tuple[int, str, str]]:
    """(pid, state, comm) of every direct child of ``pid``."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = _read(f"/proc/{entry}/stat")
        except OSError:
            continue
        comm_end = stat.rindex(")")
        rest = stat[comm_end + 2:].split()
        if int(rest[1]) == pid:
            kids.append((int(entry), rest[0], stat[stat.index("(") + 1:comm_end]))
    return kids


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


@dataclass
class AgentState:
    pid: int
    mounts: Counter
    fds: int
    threads: int
    rss_kb: int
    children: list = field(default_factory=list)

    @property
    def zombies(self) -> list:
        return [c for c in self.children if c[1] == "Z"]

    @classmethod
    def take(cls, pid: int) -> "AgentState":
        st = _status(pid)
        return cls(pid=pid, mounts=mounts(pid), fds=len(os.listdir(f"/proc/{pid}/fd")),
                   threads=int(st["Threads"]), rss_kb=int(st["VmRSS"].split()[0]),
                   children=children(pid))

    def figures(self) -> dict:
        return {"rss_mb": round(self.rss_kb / 1024, 1), "fds": self.fds, "threads": self.threads,
                "mounts": sum(self.mounts.values()), "children": len(self.children),
                "zombies": len(self.zombies)}


def mount_diff(before: Counter, after: Counter) -> list[str]:
    added = after - before
    removed = before - after
    return ([f"+mount {m}" for m in sorted(added)] + [f"-mount {m}" for m in sorted(removed)])


def leaks(before: AgentState, after: AgentState, *, fd_slack: int = 0, thread_slack: int = 0,
          rss_slack_kb: int | None = None) -> list[str]:
    """What ``after`` holds that ``before`` did not, beyond the slack given."""
    out = mount_diff(before.mounts, after.mounts)
    if after.fds > before.fds + fd_slack:
        out.append(f"fds {before.fds} -> {after.fds}")
    if after.threads > before.threads + thread_slack:
        out.append(f"threads {before.threads} -> {after.threads}")
    if after.zombies:
        out.append(f"zombies {after.zombies}")
    extra = sorted(set(c[0] for c in after.children) - set(c[0] for c in before.children))
    if extra:
        out.append(f"new children {[c for c in after.children if c[0] in extra]}")
    if rss_slack_kb is not None and after.rss_kb > before.rss_kb + rss_slack_kb:
        out.append(f"rss {before.rss_kb} kB -> {after.rss_kb} kB")
    return out


def settle(pid: int, baseline: AgentState, timeout: float = 5.0, **slack) -> list[str]:
    """Poll until the agent is back to ``baseline`` (connections and reaping are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        problems = leaks(baseline, AgentState.take(pid), **slack)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.1)


def cgroup_tree(roots: list[str]) -> set[str]:
    """Every cgroup directory below ``roots`` (the roots themselves excluded)."""
    out = set()
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                out.add(os.path.join(dirpath, d))
    return out


def tree_hash(top: str = "/etc") -> str:
    """A hash of a tree: names, types, modes, owners, symlink targets and file contents."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except OSError:
                continue
            h.update(f"{p}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p) and st.st_size < 1 << 20:
                try:
                    with open(p, "rb") as f:
                        h.update(f.read())
                except OSError:
                    h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()


@dataclass
class MachineState:
    """The machine as this (unconfined) test process sees it."""

    mounts: Counter
    etc: str
    hostname: str
    links: str
    routes: str

    @classmethod
    def take(cls) -> "MachineState":
        def ip(*args):
            return subprocess.run(["ip", "-o", *args], capture_output=True, text=True).stdout

        links = "\n".join(line.split("\\")[0] for line in ip("link").splitlines())
        return cls(mounts=mounts("self"), etc=tree_hash("/etc"), hostname=socket.gethostname(),
                   links=links, routes=ip("route") + ip("-6", "route"))

    def diff(self, after: "MachineState") -> list[str]:
        """What changed. Other people's tests share this machine: network namespaces they pin
        under /run/netns and links or routes they add are not ours, so only mounts elsewhere,
        /etc, the hostname and the links and routes that existed before are compared."""
        def ours(c: Counter) -> Counter:
            return Counter({k: v for k, v in c.items() if not k[0].startswith("/run/netns/")})

        out = ["machine " + d for d in mount_diff(ours(self.mounts), ours(after.mounts))]
        for name in ("etc", "hostname"):
            if getattr(self, name) != getattr(after, name):
                out.append(f"machine {name} changed: {getattr(self, name)!r} -> {getattr(after, name)!r}")
        for name in ("links", "routes"):
            gone = set(getattr(self, name).splitlines()) - set(getattr(after, name).splitlines())
            if gone:
                out.append(f"machine {name} changed or removed: {sorted(gone)}")
        return out


def _after_grpc_started(agent) -> AgentState:
    """The agent's state once grpcio runs. The agent starts grpcio (threads, fds) on its first gRPC
    connection and keeps it: that is not a leak of whichever test happens to speak gRPC first.
    Returns once the warm-up connection is gone (two equal readings)."""
    from kata_agent_client import AgentClient

    with AgentClient(agent.addr, proto="grpc") as client:
        client.health()
    state, deadline = AgentState.take(agent.pid), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = AgentState.take(agent.pid)
        if (now.fds, now.threads) == (state.fds, state.threads):
            break
        state = now
    return state


class Checkpoint:
    """The agent's state (and the machine's) now; ``assert_back()`` fails on anything left over."""

    def __init__(self, agent, machine: MachineState) -> None:
        self.agent, self.machine = agent, machine
        self.state = _after_grpc_started(agent)
        self.cgroups = agent.cgroups()

    def assert_back(self, timeout: float = 10) -> None:
        assert self.agent.alive(), self.agent.logs()[-3000:]
        assert self.agent.client.health() == "SERVING"
        problems = settle(self.agent.pid, self.state, timeout=timeout)
        assert not problems, problems
        assert self.agent.cgroups() == self.cgroups
        assert not self.machine.diff(MachineState.take())
