"""A process's stdio between containerd's FIFOs and the agent.

Output: ReadStdout/ReadStderr until the agent says EOF (empty data), each chunk written whole to
the FIFO before the next read, so nothing is lost when the process exits: the shim reports the
exit only after ``drain``. A FIFO whose reader went away is dropped and the agent's stream still
read to its end (a process must never block on output nobody takes). Input: a daemon thread
reads the stdin FIFO (opening it blocks until containerd's writer comes) and sends WriteStdin;
at EOF, CloseStdin.

Paths are FIFOs or files (a plain path or ``file://``); containerd's ``binary://`` loggers are
refused at Create.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time

from agent import ttrpc
from agent.protocols import agent_pb2

log = logging.getLogger(__name__)

CHUNK = 256 << 10


class UnsupportedIO(ValueError):
    pass


def io_path(uri: str) -> str:
    """The file behind a stdio URI from containerd ("" when there is none)."""
    if not uri:
        return ""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        raise UnsupportedIO(f"stdio {uri!r}: only FIFOs and files are supported, not {uri.split('://')[0]}://")
    return uri


def _open_output(path: str) -> int:
    if os.path.exists(path) and not _is_fifo(path):
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    return os.open(path, os.O_WRONLY | os.O_CLOEXEC)  # blocks until the FIFO has a reader


def _is_fifo(path: str) -> bool:
    import stat

    return stat.S_ISFIFO(os.stat(path).st_mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class ProcessIO:
    def __init__(self, call, container_id: str, exec_id: str, *, stdin: str = "", stdout: str = "",
                 stderr: str = "", terminal: bool = False) -> None:
        self.call = call  # async (method, request) -> reply
        self.ids = {"container_id": container_id, "exec_id": exec_id}
        self.paths = {"stdin": io_path(stdin), "stdout": io_path(stdout), "stderr": io_path(stderr)}
        self.terminal = terminal
        self.outputs: list[asyncio.Task] = []
        self.stdin_closed = False
        self.last_output = time.monotonic()  # when an output stream last brought data
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.outputs.append(self._loop.create_task(self._pump_out("ReadStdout", self.paths["stdout"])))
        if not self.terminal:
            self.outputs.append(self._loop.create_task(self._pump_out("ReadStderr", self.paths["stderr"])))
        if self.paths["stdin"]:
            threading.Thread(target=self._pump_in, args=(self.paths["stdin"],), daemon=True,
                             name=f"stdin-{self.ids['exec_id']}").start()

    async def _pump_out(self, method: str, path: str) -> None:
        fd = None
        if path:
            try:
                fd = await asyncio.to_thread(_open_output, path)
            except OSError as exc:
                log.warning("%s: cannot open %s: %s", method, path, exc)
        try:
            while True:
                try:
                    reply = await self.call(method, agent_pb2.ReadStreamRequest(len=CHUNK, **self.ids))
                except ttrpc.Status as exc:
                    log.debug("%s ends: %s", method, exc)
                    return
                if not reply.data:
                    return
                self.last_output = time.monotonic()
                if fd is not None:
                    try:
                        await asyncio.to_thread(_write_all, fd, reply.data)
                    except OSError as exc:
                        log.warning("%s: writing to %s: %s", method, path, exc)
                        os.close(fd)
                        fd = None
        finally:
            if fd is not None:
                os.close(fd)

    def _pump_in(self, path: str) -> None:
        loop = self._loop
        assert loop is not None

        def agent(method: str, request) -> None:
            asyncio.run_coroutine_threadsafe(self.call(method, request), loop).result()

        fd = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # blocks until a writer opens it
            while not self.stdin_closed:
                data = os.read(fd, CHUNK)
                if not data or self.stdin_closed:
                    break
                view = memoryview(data)
                while view:
                    reply = asyncio.run_coroutine_threadsafe(
                        self.call("WriteStdin", agent_pb2.WriteStreamRequest(data=bytes(view), **self.ids)),
                        loop).result()
                    view = view[reply.len or len(view):]
            if not self.stdin_closed:
                self.stdin_closed = True
                agent("CloseStdin", agent_pb2.CloseStdinRequest(**self.ids))
        except (OSError, ttrpc.Status, RuntimeError) as exc:  # RuntimeError: the loop is gone
            log.debug("stdin pump ends: %s", exc)
        finally:
            if fd is not None:
                os.close(fd)

    async def close_stdin(self) -> None:
        if self.stdin_closed:
            return
        self.stdin_closed = True
        try:
            await self.call("CloseStdin", agent_pb2.CloseStdinRequest(**self.ids))
        except ttrpc.Status as exc:
            log.debug("CloseStdin: %s", exc)

    async def drain(self, idle: float) -> None:
        """Wait until every output stream reached EOF and was written out. A stream that brought
        nothing for ``idle`` seconds after the exit is given up: a child the process left behind
        holds it open (`sh -c 'sleep 100 & echo started'`), and its exit must not hang on that.
        A stream still bringing data is never cut."""
        pending = {t for t in self.outputs if not t.done()}
        while pending:
            _, pending = await asyncio.wait(pending, timeout=min(idle, 0.5))
            if pending and time.monotonic() - self.last_output >= idle:
                log.info("output of %s still open %s s after its exit without data: no longer read",
                         self.ids, idle)
                for task in pending:
                    task.cancel()
                return

    def cancel(self) -> None:
        self.stdin_closed = True
        for task in self.outputs:
            task.cancel()
