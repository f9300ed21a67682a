"""A process's stdio on the agent side: pipes, or a pty when the process has a terminal.

``Stdio.create(terminal)`` returns the agent's ends and the three fds the child gets as 0, 1, 2
(the caller hands them to the spawner and closes them). Reads return as soon as some data is
there and ``b""`` at EOF, as Kata's agent does; the pipes stay open until ``close``, so no output
is lost when the process exits before anyone read it.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import struct
import termios

from agent.errors import FailedPrecondition

log = logging.getLogger(__name__)


def _nonblocking(fd: int) -> int:
    os.set_blocking(fd, False)
    return fd


class Stdio:
    def __init__(self, terminal: bool, stdin: int | None, stdout: int | None, stderr: int | None) -> None:
        self.terminal = terminal
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self._locks = {name: asyncio.Lock() for name in ("stdin", "stdout", "stderr")}
        self._waiters: set[asyncio.Future] = set()
        self._eof: set[str] = set()
        # called once every output stream has been read to EOF (a finished exec's fds then go)
        self.on_drained = None

    @property
    def drained(self) -> bool:
        return {"stdout"} <= self._eof if self.terminal else {"stdout", "stderr"} <= self._eof

    def _at_eof(self, stream: str) -> None:
        if stream in self._eof:
            return
        self._eof.add(stream)
        fd = getattr(self, stream)
        if not self.terminal and fd is not None:  # a pty's master is stdin too: kept until close()
            setattr(self, stream, None)
            os.close(fd)
        if self.drained and self.on_drained is not None:
            self.on_drained()

    async def _ready(self, fd: int, write: bool = False) -> None:
        """Wait until ``fd`` is readable (writable), or until ``close`` wakes every waiter."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)
        add(fd, lambda: fut.done() or fut.set_result(None))
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            remove(fd)

    @classmethod
    def create(cls, terminal: bool, rows: int = 0, cols: int = 0, pipe_size: int = 0) -> tuple["Stdio", list[int]]:
        """``pipe_size`` > 0 sets each pipe's capacity (agent.container_pipe_size, as Kata's agent)."""
        if terminal:
            master, slave = os.openpty()
            os.set_inheritable(master, False)
            if rows and cols:
                fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            return cls(True, _nonblocking(master), master, None), [slave, slave, slave]
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        if pipe_size > 0:
            for fd in (in_w, out_w, err_w):
                try:
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, pipe_size)
                except OSError as exc:
                    log.warning("agent.container_pipe_size %d not applied: %s", pipe_size, exc)
                    break
        stdio = cls(False, _nonblocking(in_w), _nonblocking(out_r), _nonblocking(err_r))
        return stdio, [in_r, out_w, err_w]

    async def read(self, stream: str, size: int) -> bytes:
        """Up to ``size`` bytes from "stdout" or "stderr"; waits for data; ``b""`` at EOF."""
        fd = getattr(self, stream)
        size = size or 65536
        async with self._locks[stream]:
            while True:
                fd = getattr(self, stream)
                if fd is None or stream in self._eof:
                    return b""
                try:
                    data = os.read(fd, min(size, 1 << 20))
                except BlockingIOError:
                    await self._ready(fd)
                    continue
                except OSError as exc:
                    if exc.errno != errno.EIO:  # pty: the other side is closed
                        raise
                    data = b""
                if not data:
                    self._at_eof(stream)
                return data

    async def write(self, data: bytes) -> int:
        async with self._locks["stdin"]:
            view = memoryview(data)
            while view:
                if self.stdin is None:
                    raise FailedPrecondition("stdin: closed")
                try:
                    n = os.write(self.stdin, view)
                except BlockingIOError:
                    await self._ready(self.stdin, write=True)
                    continue
                except BrokenPipeError:
                    raise FailedPrecondition("stdin: the process closed it") from None
                view = view[n:]
            return len(data)

    def close_stdin(self) -> None:
        if self.terminal:
            if self.stdin is not None:
                os.write(self.stdin, b"\x04")  # EOF for the line discipline
            return
        if self.stdin is not None:
            os.close(self.stdin)
            self.stdin = None

    def resize(self, rows: int, cols: int) -> None:
        if not self.terminal or self.stdout is None:
            raise FailedPrecondition("the process has no terminal")
        fcntl.ioctl(self.stdout, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def close(self) -> None:
        fds = {self.stdin, self.stdout, self.stderr} - {None}
        self.stdin = self.stdout = self.stderr = None
        loop = asyncio.get_running_loop()
        for fut in list(self._waiters):
            if not fut.done():
                fut.set_result(None)
        for fd in fds:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            os.close(fd)
