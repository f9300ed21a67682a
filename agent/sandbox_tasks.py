"""Spawner tasks of the sandbox (run in a forked child of the spawner, never in the gRPC process).

``sandbox-pidns-init``: the init of the sandbox PID namespace. The task's worker unshares a PID
namespace and forks; that child is PID 1 there and does nothing but reap: every orphan of the
namespace's containers is re-parented to it and reaped at once (Kata's pause leaked these
zombies, kata-containers/agent#803). SIGTERM ends it, and with it the namespace. The reply is
``{"init_pid": PID}``, the init's pid as the agent sees it; the worker then exits and the init is
re-parented to the agent (a child subreaper).
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable

from agent import linux

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _reap_all() -> int:
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def init_loop(lifeline: int) -> None:
    """PID 1 of the sandbox namespace: reap until told to stop or the agent goes away.

    ``lifeline`` is the read end of a pipe whose write end only the agent holds: end of file
    there means the agent died, and the namespace must not outlive it.
    """
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, lambda *_: os._exit(0))
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    while True:
        _reap_all()
        ready, _, _ = select.select([lifeline, wake_r], [], [])
        if lifeline in ready and not os.read(lifeline, 1):
            os._exit(0)
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass


def sandbox_pidns_init(args: dict, fds: list[int], reply: Callable[[dict], None]) -> None:
    """``fds[0]``: the lifeline (see init_loop)."""
    if len(fds) != 1:
        raise ValueError("sandbox-pidns-init takes one fd, the lifeline")
    lifeline = fds[0]
    linux.unshare(linux.CLONE_NEWPID)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.write(ready_w, b"1")
            os.close(ready_w)
            os.closerange(3, lifeline)  # nothing of the spawner's stays open in the init
            os.closerange(lifeline + 1, 1 << 16)
            init_loop(lifeline)
        finally:
            os._exit(1)
    os.close(ready_w)
    ok = os.read(ready_r, 1)
    os.close(ready_r)
    if ok != b"1":
        raise OSError("sandbox pid namespace init died before it was ready")
    reply({"init_pid": pid})


# The spawner's tasks by name (agent.runtime.spawner runs them in a forked child).
TASKS: dict[str, Callable[[dict, list[int], Callable[[dict], None]], None]] = {
    "sandbox-pidns-init": sandbox_pidns_init,
}
