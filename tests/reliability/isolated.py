"""An agent confined for hostile input: its own mount, network, UTS and IPC namespaces, and its
own cgroup subtree.

``IsolatedAgent`` starts ``python -m agent`` like tests/support.py does, and more:

- ``unshare --mount --net --uts --ipc``: interfaces, routes, iptables, hostname and mounts it
  touches are its own; it listens on a unix socket in the test's directory;
- in each cgroup hierarchy it gets a fresh child of our own cgroup (``.../reliability-<tag>``),
  moves there, sees it as the hierarchy's mount (a bind mount over it in its mount namespace)
  and as its cgroup namespace root: every cgroup it makes lands below that child, which the
  harness lists (leak check) and removes afterwards. The machine's cgroups stay out of its reach;
- with ``readonly_host`` (the default) the machine's root file system, /dev, /sys and /proc/sys
  are remounted read-only in its namespace; only its tmpfs /run and the work directory stay
  writable. A request that makes it write elsewhere then fails with "Read-only file system"
  (EROFS) instead of changing the machine, and the fuzz tests treat that message as a failure.

The working directory is the work directory, so relative paths land there and are visible.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

from tests.support import AgentProcess

ROOT = pathlib.Path(__file__).resolve().parents[2]
CGROUP_ROOT = "/sys/fs/cgroup"

_SETUP = r"""
set -e
mount -t tmpfs -o mode=755 agent-run /run
for pair in $REL_CGROUPS; do
    echo $$ > "${pair%%=*}/cgroup.procs"
    mount --bind "${pair%%=*}" "${pair#*=}"
done
ip link set lo up 2>/dev/null || true
if [ "$REL_READONLY" = 1 ]; then
    mount --bind "$REL_WORK" "$REL_WORK"
    mount -o remount,bind,ro /
    mount -o remount,bind,ro /dev
    mount -o remount,bind,ro /sys
    mount --bind /proc/sys /proc/sys
    mount -o remount,bind,ro /proc/sys
fi
unset REL_CGROUPS REL_READONLY REL_WORK
exec unshare --cgroup -- "$@"
"""


def cgroup_hierarchies() -> list[tuple[str, str]]:
    """(mount point, our own cgroup there) for each of the machine's cgroup hierarchies."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            own[controllers] = path
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            if fstype == "cgroup2":
                out.append((left.split()[4], own.get("", "/")))
            elif fstype == "cgroup":
                words = set(opts.split(","))
                for controllers, path in own.items():
                    if controllers and set(controllers.split(",")) <= words:
                        out.append((left.split()[4], path))
                        break
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so no agent outlives it."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def sweep_stale_cgroups() -> None:
    """Remove reliability-* cgroups of earlier runs that were killed: only trees without a process."""
    import glob

    for h, own in cgroup_hierarchies():
        for sub in glob.glob(os.path.join(h, own.lstrip("/"), "reliability-*")):
            busy = False
            for dirpath, _, _ in os.walk(sub):
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        busy = busy or bool(f.read().strip())
                except OSError:
                    pass
            if not busy:
                remove_cgroup_tree(sub)


def _make_cgroup(path: str, parent: str) -> None:
    os.mkdir(path)
    for name in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset child starts empty
        src = os.path.join(parent, name)
        if os.path.exists(src) and os.path.exists(os.path.join(path, name)):
            with open(src) as f:
                value = f.read().strip()
            with open(os.path.join(path, name), "w") as f:
                f.write(value)


def remove_cgroup_tree(path: str) -> list[str]:
    """Kill what is left in the tree, remove it bottom-up; returns what could not be removed."""
    left = []
    if not os.path.isdir(path):
        return left
    for dirpath, dirnames, _ in os.walk(path, topdown=False):
        for attempt in range(50):
            try:
                with open(os.path.join(dirpath, "cgroup.procs")) as f:
                    pids = [int(p) for p in f.read().split()]
            except OSError:
                pids = []
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.rmdir(dirpath)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)
        else:
            left.append(dirpath)
    return left


class IsolatedAgent(AgentProcess):
    """Shares stop/kill with tests.support.AgentProcess; starts differently."""

    def __init__(self, workdir: pathlib.Path, extra_args: list[str] | None = None, *,
                 readonly_host: bool = True, env: dict | None = None, timeout: float = 30) -> None:
        self.work = pathlib.Path(workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tag = uuid.uuid4().hex[:10]
        self.sock = self.work / f"agent-{self.tag}.sock"
        self.addr = f"unix://{self.sock}"
        self.log_path = self.work / f"agent-{self.tag}.log"
        self.cgroup_roots: list[str] = []
        sweep_stale_cgroups()
        pairs = []
        for h, own in cgroup_hierarchies():
            parent = os.path.join(h, own.lstrip("/"))
            sub = os.path.join(parent, f"reliability-{self.tag}")
            _make_cgroup(sub, parent)
            self.cgroup_roots.append(sub)
            pairs.append(f"{sub}={h}")
        self._log = open(self.log_path, "wb")
        cmd = ["unshare", "--mount", "--net", "--uts", "--ipc", "--propagation", "private", "--",
               "sh", "-c", _SETUP, "sh",
               sys.executable, "-m", "agent", "--server-addr", self.addr, "--log-level", "debug",
               "--cmdline-file", "/dev/null", *(extra_args or [])]
        environ = {**os.environ, **(env or {}),
                   "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "host-client")]),
                   "PYTHONDONTWRITEBYTECODE": "1",
                   "REL_CGROUPS": " ".join(pairs), "REL_READONLY": "1" if readonly_host else "0",
                   "REL_WORK": str(self.work)}
        self.proc = subprocess.Popen(cmd, cwd=self.work, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=environ, start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid
        self._connect(timeout)

    def _exited(self) -> None:
        self._cleanup_cgroups()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def cgroups(self) -> set[str]:
        from tests.reliability.invariants import cgroup_tree

        return cgroup_tree(self.cgroup_roots)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, wait, remove the cgroup subtree; returns the exit code."""
        try:
            return AgentProcess.stop(self, timeout)
        finally:
            self._cleanup_cgroups()

    def kill(self) -> None:
        AgentProcess.kill(self)
        self._cleanup_cgroups()

    def _cleanup_cgroups(self) -> list[str]:
        left = []
        for root in self.cgroup_roots:
            left += remove_cgroup_tree(root)
        return left
