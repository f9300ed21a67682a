"""Run an external command (modprobe, iptables-restore, ...) without blocking the event loop.

The agent reaps every child itself (agent.runtime.reaper), so asyncio's subprocess support, which
waits for its own children, cannot be used. ``posix_spawn`` is safe in a multi-threaded process.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass

from agent.runtime.reaper import REAPER, exit_code


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    def error_text(self) -> str:
        """The command's own complaint, for an error message."""
        text = (self.stderr or self.stdout).decode(errors="replace").strip()
        return text or f"exit status {self.returncode}"


class CommandTimeout(TimeoutError):
    pass


async def _read_all(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0))
    try:
        return await reader.read()
    finally:
        transport.close()


async def _write_all(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.connect_write_pipe(
        asyncio.Protocol, os.fdopen(fd, "wb", buffering=0))
    try:
        transport.write(data)
    finally:
        transport.close()


async def run(argv: list[str], *, input: bytes | None = None, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> Completed:
    """Run ``argv`` (searched in PATH) to completion; kill it after ``timeout`` seconds."""
    if not argv:
        raise ValueError("empty command")
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.posix_spawnp(
            argv[0], argv, dict(os.environ if env is None else env),
            file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                          (os.POSIX_SPAWN_DUP2, err_w, 2)],
            setsigdef=(signal.SIGPIPE, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT),
        )
    except BaseException:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        raise
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    status_fut = REAPER.wait(pid)
    writer = asyncio.ensure_future(_write_all(in_w, input or b""))
    out = asyncio.ensure_future(_read_all(out_r))
    err = asyncio.ensure_future(_read_all(err_r))
    try:
        status = await asyncio.wait_for(asyncio.shield(status_fut), timeout)
    except asyncio.TimeoutError:
        os.kill(pid, signal.SIGKILL)
        await status_fut
        for task in (writer, out, err):
            task.cancel()
        await asyncio.gather(writer, out, err, return_exceptions=True)
        raise CommandTimeout(f"{argv[0]}: no exit after {timeout:g} s, killed") from None
    stdout, stderr, _ = await asyncio.gather(out, err, writer, return_exceptions=True)
    return Completed(list(argv), exit_code(status),
                     stdout if isinstance(stdout, bytes) else b"",
                     stderr if isinstance(stderr, bytes) else b"")
