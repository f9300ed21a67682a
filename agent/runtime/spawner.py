"""The spawner: a single-threaded process, forked before grpc exists, that forks every container.

``start_spawner(cfg)`` (called by agent.__main__ while the agent is still single-threaded) forks
it. The agent sends it one SOCK_SEQPACKET message per request: JSON plus fds by SCM_RIGHTS, the
first fd being the child's end of a fresh per-request ``sync`` socketpair. The spawner forks an
intermediate child that does the work (agent.runtime.child) and reports on ``sync``; the spawner
itself never answers, so the agent side needs no request ids.

Other areas run code in a forked child with ``await agent.spawner.run_task(name, args, fds)``;
the function is registered with ``@task("name")`` in a module listed in TASK_MODULES.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from agent import linux

TASK_MODULES = ("agent.sandbox_tasks",)
TASKS: dict[str, Callable[[dict, list[int], Callable[[dict], None]], Any]] = {}
MAX_MESSAGE = 1 << 18
MAX_FDS = 16


class SpawnError(Exception):
    """The spawner or its child failed; the message is the child's own report."""


def task(name: str):
    def register(fn):
        if name in TASKS:
            raise RuntimeError(f"spawner task {name} registered twice")
        TASKS[name] = fn
        return fn

    return register


def _import_tasks() -> None:
    for name in TASK_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


# --- the spawner process ------------------------------------------------------------------------

def _serve(sock: socket.socket) -> None:
    """Keep one forked "zygote" waiting on the agent's socket, so that no request waits for a fork.

    The zygote takes one request, tells the spawner (``taken``), and becomes the request's
    intermediate child; the spawner then forks the next zygote and reaps the old ones.
    """
    import gc

    from agent.runtime import child

    # Forked children run briefly and exit or exec: a collection there would write to every
    # object's page and copy it. Freezing also keeps the spawner's own pages shared.
    gc.disable()
    gc.freeze()

    me = os.getpid()
    while True:
        taken_r, taken_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(taken_r)
            os.close(taken_w)
            _reap(block=True)  # out of processes: wait for one of ours to go
            continue
        if pid == 0:
            os.close(taken_r)
            _zygote(child, sock, taken_w, me)
        os.close(taken_w)
        word = _read_word(taken_r)  # b"t": taken, b"q": the agent is gone, b"": it died
        os.close(taken_r)
        _reap()
        if word == b"q":
            os._exit(0)


def _read_word(fd: int) -> bytes:
    while True:
        try:
            return os.read(fd, 1)
        except InterruptedError:
            continue


def _reap(block: bool = False) -> None:
    """Reap finished intermediates (they exit as soon as they have forked)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0 or block:
            return


def _zygote(child, sock: socket.socket, taken: int, spawner: int) -> None:
    try:
        # A zygote dies with its spawner: the requests queued for it then end (their sync
        # sockets close) instead of waiting for a zygote that never comes.
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spawner:
            os._exit(0)
        while True:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
                break
            except InterruptedError:
                continue
        if not msg:
            os.write(taken, b"q")
            os._exit(0)
        os.write(taken, b"t")
        os.close(taken)
        sock.close()
        os.set_inheritable(fds[0], False)  # EOF for the agent when the child execs
        _child(child, json.loads(msg), socket.socket(fileno=fds[0]), fds[1:])
    finally:
        os._exit(1)


def _child(child, req: dict[str, Any], sync: socket.socket, fds: list[int]) -> None:
    try:
        op = req["op"]
        if op == "create":
            child.spawn_container(req["config"], sync, fds, req.get("cgroup"))
        elif op == "exec":
            child.spawn_exec(req, sync, fds, req.get("cgroup"))
        elif op == "task":
            fn = TASKS.get(req["name"])
            if fn is None:
                child.fail(sync, f"no spawner task {req['name']!r}")
            child.spawn_task(fn, req["args"], sync, fds)
        child.fail(sync, f"unknown spawner request {op!r}")
    except BaseException as exc:  # noqa: BLE001 - never return into the spawner's loop
        child.fail(sync, f"{type(exc).__name__}: {exc}")


SPAWNER_FD = 3


def start_spawner(cfg: Any = None) -> "Spawner":
    """Start the spawner: a fresh ``python -S`` that imports only what it needs.

    Started with posix_spawn, so it can also be restarted later from the multi-threaded agent
    (Spawner.supervise). A small spawner forks faster (page tables, copy-on-write): about 0.6 ms
    instead of 1.6 ms here.
    """
    pid, sock = _spawn()
    return Spawner(pid, sock)


def _spawn() -> tuple[int, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-S", "-c", "from agent.runtime.spawner import main; main()", str(os.getpid())]
    src = theirs.fileno()
    if src == SPAWNER_FD:  # dup2(3, 3) would leave close-on-exec set
        src = os.dup(src)
    try:
        pid = os.posix_spawn(sys.executable, argv, env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, src, SPAWNER_FD)])
    except BaseException:
        ours.close()
        raise
    finally:
        if src != theirs.fileno():
            os.close(src)
        theirs.close()
    return pid, ours


def main() -> None:
    """The spawner process (exec'd by start_spawner)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != int(sys.argv[1]):
            os._exit(0)  # the agent (possibly PID 1) died before PR_SET_PDEATHSIG took hold
        _import_tasks()
        from agent.runtime import seccomp

        seccomp.preload()  # mapped before any child pivots into a rootfs without it
        sock = socket.socket(fileno=SPAWNER_FD)
        os.set_inheritable(SPAWNER_FD, False)
        _serve(sock)
    finally:
        os._exit(1)


# --- the agent side -----------------------------------------------------------------------------

class Spawner:
    """The agent's handle on the spawner process (all methods run in the event loop)."""

    RESTARTS = 5  # at most this many restarts ...
    RESTART_WINDOW = 60.0  # ... within this many seconds; then requests fail

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.closed = False
        self.gone = ""  # why there is no spawner any more (requests fail with it)
        self.restarts: list[float] = []  # monotonic times of the restarts

    def supervise(self) -> None:
        """Restart the spawner when it dies (the OOM killer, a bug) while the agent serves.

        Requests in flight fail (their sync sockets close with the spawner's zygote); new ones go
        to the new spawner. A spawner that keeps dying is not restarted for ever: after RESTARTS
        restarts within RESTART_WINDOW seconds, requests fail with the reason.
        """
        from agent.runtime.reaper import REAPER

        REAPER.wait(self.pid).add_done_callback(self._exited)

    def _exited(self, fut) -> None:
        import logging
        import time

        if self.closed or fut.cancelled():
            return
        log = logging.getLogger(__name__)
        status = fut.result()
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < self.RESTART_WINDOW]
        old_pid, old = self.pid, self.sock
        old.close()  # requests queued there end now, whatever follows
        if len(self.restarts) >= self.RESTARTS:
            self.gone = (f"the container spawner died {len(self.restarts) + 1} times in "
                         f"{self.RESTART_WINDOW:.0f} s (last wait status {status}); not restarted")
            log.error(self.gone)
            return
        try:
            self.pid, self.sock = _spawn()
        except OSError as exc:
            self.gone = f"the container spawner died and could not be restarted: {exc}"
            log.error(self.gone)
            return
        self.restarts.append(now)
        log.error("the container spawner exited; started a new one",
                  extra={"fields": {"old_pid": old_pid, "status": status, "pid": self.pid}})
        self.supervise()

    def request(self, req: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> socket.socket:
        """Send ``req`` with ``fds``; returns the agent's end of the request's sync socket."""
        if self.gone:
            raise SpawnError(self.gone)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self.sock, [json.dumps(req).encode()], [theirs.fileno(), *fds])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return ours

    async def run_task(self, name: str, args: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> dict:
        """Run task ``name`` in a double-forked child; its first reply, plus ``"pid"``."""
        sync = self.request({"op": "task", "name": name, "args": args}, fds)
        with sync:
            pid = await receive_pid(sync)
            reply = await receive(sync)
        if reply is None:
            raise SpawnError(f"task {name}: exited without a reply")
        if "error" in reply:
            raise SpawnError(f"task {name}: {reply['error']}")
        return {**reply, "pid": pid}

    def close(self) -> None:
        self.closed = True
        self.sock.close()


async def receive(sync: socket.socket) -> dict[str, Any] | None:
    """The next JSON message on a sync socket, or None at EOF."""
    import asyncio

    data = await asyncio.get_running_loop().sock_recv(sync, MAX_MESSAGE)
    return json.loads(data) if data else None


async def receive_pid(sync: socket.socket) -> int:
    msg = await receive(sync)
    if msg is None:
        raise SpawnError("the spawner's child exited without reporting")
    if "error" in msg:
        raise SpawnError(msg["error"])
    return int(msg["pid"])
