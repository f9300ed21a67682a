"""The agent's one reaper. The agent is a child subreaper (or PID 1): every orphan ends up here.

All children are reaped by ``waitpid(-1)`` on SIGCHLD, in the event loop. Whoever started a process
awaits its status with ``REAPER.wait(pid)``; a status that arrives before anyone asked (a process
that exits before its starter learnt its pid) is kept for a while so that it is not lost. Nothing
else in the agent may call waitpid (no asyncio subprocesses: use agent.runtime.command).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal

log = logging.getLogger(__name__)

UNCLAIMED_MAX = 4096


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for a signal."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


class Reaper:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.reaped = 0

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.reaped += 1
            fut = self._waiters.pop(pid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(status)
                continue
            self._unclaimed[pid] = status
            while len(self._unclaimed) > UNCLAIMED_MAX:
                self._unclaimed.popitem(last=False)

    def wait(self, pid: int) -> asyncio.Future[int]:
        """A future for ``pid``'s raw wait status. Call it before or after the exit, once per pid."""
        assert self._loop is not None, "Reaper.install() first"
        fut = self._waiters.get(pid)
        if fut is not None:
            return fut
        fut = self._loop.create_future()
        status = self._unclaimed.pop(pid, None)
        if status is not None:
            fut.set_result(status)
        else:
            self._waiters[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """Stop waiting for ``pid`` (its status, when it comes, is dropped into the unclaimed pool)."""
        self._waiters.pop(pid, None)


REAPER = Reaper()
