"""vsock listeners for the gRPC server.

PyPI's grpcio is built without vsock support ("VSOCK is not supported"), so the agent accepts
vsock connections itself and relays each one, byte for byte, to a private unix socket that the
gRPC server listens on. The unix socket lives in a root-only directory under the agent's run dir,
out of reach of containers (an abstract socket would be reachable from any process sharing the
guest's network namespace).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from agent.config import Address

log = logging.getLogger(__name__)

BUFSIZE = 256 * 1024


def vsock_listener(addr: Address, backlog: int = 128) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError(f"{addr}: this Python has no AF_VSOCK")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((addr.cid, addr.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFSIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class Relay:
    """Accepts on ``listener`` and joins every connection to the unix socket ``backend``."""

    def __init__(self, listener: socket.socket, backend: str, name: str) -> None:
        self.listener = listener
        self.backend = backend
        self.name = name
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self.listener)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        try:
            backend_r, backend_w = await asyncio.open_unix_connection(self.backend)
        except OSError as exc:
            log.warning("vsock relay: backend unreachable", extra={"fields": {"error": str(exc)}})
            client_w.close()
            self._conns.discard(task)
            return
        try:
            await asyncio.gather(_pipe(client_r, backend_w), _pipe(backend_r, client_w))
        finally:
            for w in (client_w, backend_w):
                w.close()
            self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        try:
            os.unlink(self.backend)
        except FileNotFoundError:
            pass


def relay_backend_path(run_dir: str) -> str:
    """A root-only directory for the relay's unix socket; created on demand."""
    path = os.path.join(run_dir, "kata-agent")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return os.path.join(path, f"vsock-relay-{os.getpid()}.sock")
