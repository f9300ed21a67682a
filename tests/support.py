"""What the tests and the benchmarks share: the agent as a process on this machine, and a busybox
container root. Plain code, no pytest: bench/ imports it too, and tests/integration/conftest.py
builds its fixtures on it.

``AgentProcess`` starts ``python -m agent`` under ``unshare --mount --propagation private`` with a
fresh tmpfs on /run, so every mount it makes dies with it and the machine's /run is untouched.
``make_busybox_rootfs`` builds a minimal container root from Debian's busybox-static.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, through /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in pathlib.Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in children.read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
UNIFIED = CGROUP_ROOT / "unified"  # the cgroup2 mount of a hybrid host


def agent_cgroups() -> set[pathlib.Path]:
    """The agent's default container cgroups (kata-agent/<id>) in every hierarchy, and their
    kata-agent parent (which an agent that is killed leaves behind)."""
    return {p for pattern in ("*/kata-agent", "*/kata-agent/*", "kata-agent", "kata-agent/*")
            for p in CGROUP_ROOT.glob(pattern) if p.is_dir()}


def remove_new_cgroups(before: set[pathlib.Path]) -> None:
    for path in sorted(agent_cgroups() - before, key=lambda p: len(p.parts), reverse=True):
        for _ in range(50):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


class AgentProcess:
    """A running agent: ``client`` is a kata_agent_client.AgentClient connected to it."""

    def __init__(self, tmp: pathlib.Path, extra_args: list[str] | None = None, env: dict | None = None,
                 cgroup_v1_only: bool = False):
        self._cgroups_before = agent_cgroups()
        self.port = free_port()
        self.addr = f"tcp://127.0.0.1:{self.port}"
        self.log_path = tmp / f"agent-{self.port}.log"
        self._log = open(self.log_path, "wb")
        # cgroup_v1_only: the hybrid cgroup2 mount is unmounted in the agent's private mount
        # namespace, so that it sees (and uses) the v1 hierarchies alone, as on a v1 host.
        setup = "mount -t tmpfs -o mode=755 agent-run /run"
        if cgroup_v1_only:
            setup += f" && umount -l {UNIFIED}"
        cmd = ["unshare", "--mount", "--propagation", "private", "--",
               "sh", "-c", setup + ' && exec "$@"', "sh",
               sys.executable, "-m", "agent", "--server-addr", self.addr, "--log-level", "debug",
               "--cmdline-file", "/dev/null", *(extra_args or [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        self.pid = self.proc.pid
        self._connect(20)

    def _connect(self, timeout: float) -> None:
        """``client``, once the agent answers; an error with the agent's log when it does not."""
        from kata_agent_client import AgentClient

        self.client = AgentClient(self.addr, timeout=60)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._exited()
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                self.client.wait_ready(timeout=0.5)
                self._wait_serving(deadline)
                self._wait_zygote(min(deadline, time.monotonic() + 5))
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"agent not ready after {timeout} s:\n{self.logs()}")

    def _wait_serving(self, deadline: float) -> None:
        """Until the agent logged "agent serving": it answers Health as soon as it listens, and
        builds the rest after (agent.wiring); tests that snapshot the machine start from there."""
        while '"msg": "agent serving"' not in self.logs():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the agent answered Health but did not log 'agent serving'")
            time.sleep(0.02)

    def _wait_zygote(self, deadline: float) -> None:
        """Until the spawner's PID-1 zygote is up (made with CLONE_PARENT, a child of the agent,
        PID 1 of its namespace), so that tests comparing the agent's children see it from the
        start: the spawner makes it once its imports are done, after the agent answers."""
        while time.monotonic() < deadline:
            for pid in descendants(self.pid):
                try:
                    nspid = next((line.split()[1:] for line in open(f"/proc/{pid}/status")
                                  if line.startswith("NSpid:")), [])
                except OSError:
                    continue
                if len(nspid) > 1 and nspid[-1] == "1":
                    return
            time.sleep(0.02)

    def _exited(self) -> None:
        """Undo what the start made, when the agent exited before it answered."""

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the agent and everything it started (container inits call setsid, so the
        process group is not enough), then remove the cgroups its containers left."""
        if self.proc.poll() is None:
            pids = descendants(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGKILL)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        remove_new_cgroups(self._cgroups_before)


def shift_ids(root, by: int) -> None:
    """chown every entry of ``root`` (itself included, links not followed) by ``by`` ids: a root
    for a container whose ids are mapped that far, as runc's own tests prepare theirs."""
    for path, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(path, name)
            st = os.lstat(full)
            os.lchown(full, st.st_uid + by, st.st_gid + by)
    st = os.lstat(root)
    os.lchown(root, st.st_uid + by, st.st_gid + by)


def make_busybox_rootfs(dest: pathlib.Path) -> pathlib.Path:
    """A container root: busybox-static with its applets, /etc/passwd and /etc/group."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
              "home/user", "run", "var"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True, check=True)
    for path in applets.stdout.split():
        link = dest / path
        if not link.exists() and not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        "user:x:1000:1000:user:/home/user:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (dest / "etc" / "group").write_text(
        "root:x:0:\ntty:x:5:\nusers:x:100:user\nuser:x:1000:\nextra:x:2000:user\nnogroup:x:65534:\n")
    (dest / "etc" / "hostname").write_text("busybox\n")
    os.chown(dest / "home" / "user", 1000, 1000)
    return dest
