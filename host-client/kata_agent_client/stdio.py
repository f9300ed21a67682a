"""Stream a container process's stdio between this terminal and the agent.

Output: ReadStdout/ReadStderr loops until the agent returns empty data (EOF). Input: stdin is
forwarded with WriteStdin and closed with CloseStdin at EOF. With ``tty`` the local terminal is
put in raw mode and its size is forwarded with TtyWinResize now and on every SIGWINCH.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import termios
import threading
import tty
from contextlib import contextmanager

import grpc

from agent.protocols import agent_pb2

CHUNK = 32 * 1024


class ProcessIO:
    def __init__(self, client, container_id: str, exec_id: str = "", *, tty: bool = False) -> None:
        self.client = client
        self.cid = container_id
        self.exec_id = exec_id
        self.tty = tty
        self._threads: list[threading.Thread] = []

    def _ids(self) -> dict:
        return {"container_id": self.cid, "exec_id": self.exec_id}

    def _pump_out(self, method: str, out) -> None:
        while True:
            try:
                reply = self.client.call(method, agent_pb2.ReadStreamRequest(len=CHUNK, **self._ids()),
                                         timeout=None)
            except grpc.RpcError:
                return
            if not reply.data:
                return
            out.write(reply.data)
            out.flush()

    def _pump_in(self, fd: int) -> None:
        try:
            while True:
                data = os.read(fd, CHUNK)
                if not data:
                    break
                self.client.call("WriteStdin", agent_pb2.WriteStreamRequest(data=data, **self._ids()))
            self.client.call("CloseStdin", agent_pb2.CloseStdinRequest(**self._ids()))
        except (grpc.RpcError, OSError):
            return

    def resize(self, *_args) -> None:
        size = shutil.get_terminal_size()
        try:
            self.client.call("TtyWinResize", agent_pb2.TtyWinResizeRequest(
                row=size.lines, column=size.columns, **self._ids()))
        except grpc.RpcError:
            pass

    def start(self, *, stdin: bool = True) -> None:
        outputs = [("ReadStdout", sys.stdout.buffer)]
        if not self.tty:
            outputs.append(("ReadStderr", sys.stderr.buffer))
        for method, out in outputs:
            self._spawn(self._pump_out, method, out)
        if stdin:
            self._spawn(self._pump_in, sys.stdin.fileno())
        if self.tty and sys.stdin.isatty():
            signal.signal(signal.SIGWINCH, self.resize)
            self.resize()

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        if fn != self._pump_in:  # bound methods compare equal, never identical
            self._threads.append(t)

    def wait(self) -> int:
        """The exit code (128+N for a signal), once all output has been written out."""
        reply = self.client.call("WaitProcess", agent_pb2.WaitProcessRequest(**self._ids()), timeout=None)
        for t in self._threads:
            t.join(5)
        return reply.status


@contextmanager
def raw_terminal(enabled: bool):
    """Raw mode on stdin for the duration, restored even on errors."""
    if not enabled or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
