"""The agent's listeners: every address serves ttrpc and gRPC, told apart by a connection's first bytes.

    listener (vsock | tcp | unix | serial) --first byte 0x00-------------> ttrpc (agent.ttrpc, this loop)
                                          \\--"PRI * HTTP/2.0" preface--> relayed to grpcio's socket

A ttrpc frame starts with the high byte of its length, 0 for any frame under 16 MiB; an HTTP/2
connection starts with its fixed preface. Anything else, or a preface begun but not completed
within SNIFF_SECONDS, closes that connection and nothing else. (A client may connect and stay
silent: pools open connections before their first call.) A virtio-serial port (agent.serial) is a
listener with one connection at a time: each host connection is a session that is sniffed alike.

grpcio is started on the first gRPC connection (agent.grpc_server), listening on a unix socket in
a root-only directory of the run dir; the listeners relay gRPC connections to it byte for byte.
PyPI's grpcio has no vsock, and one listener per address must serve both protocols anyway.
"""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import os
import socket
import stat

from agent.config import Address
from agent.serial import SerialPort
from agent.service import Services
from agent.ttrpc import ServerConnection
from agent.vsock import vsock_listener

log = logging.getLogger(__name__)

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SNIFF_SECONDS = 10.0


class ListenError(OSError):
    """A listen address could not be bound; ``reason`` says why, without the address."""

    def __init__(self, addr: Address | str, reason: str, errno_: int = 0) -> None:
        super().__init__(f"cannot listen on {addr}: {reason}")
        self.reason = reason
        self.errno = errno_


# ---------------------------------------------------------------------------------- sockets

def _prepare_unix(addr: Address) -> None:
    """Make way for a unix socket at ``addr``: a stale socket file (left by an earlier agent:
    nobody listens, a connect is refused) is removed; a live one (a connect succeeds) is refused,
    the address is in use; so is a file that is not a socket."""
    if addr.scheme != "unix" or addr.abstract:
        return
    try:
        st = os.lstat(addr.host)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "exists and is not a socket")
    if _answers(addr.host):
        raise OSError(errno.EADDRINUSE, "address in use (a listener answers on it)")
    os.unlink(addr.host)


def _answers(path: str) -> bool:
    """Whether something listens on the unix socket ``path`` (the probe connection is closed at
    once)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):  # stale, or gone meanwhile
        return False
    except BlockingIOError:  # its backlog is full: alive
        return True
    except OSError as exc:
        if exc.errno == errno.EPROTOTYPE:  # bound by a live socket of another type
            return True
        raise
    finally:
        probe.close()
    return True


def listen_socket(addr: Address, backlog: int = 128) -> socket.socket:
    """A non-blocking listening socket for ``addr``."""
    try:
        if addr.scheme == "vsock":
            return vsock_listener(addr, backlog)
        if addr.scheme == "tcp":
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.create_server((addr.host, addr.port), family=family, backlog=backlog)
        else:
            _prepare_unix(addr)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind("\0" + addr.host if addr.abstract else addr.host)
                sock.listen(backlog)
            except OSError:
                sock.close()
                raise
    except OSError as exc:
        raise ListenError(addr, exc.strerror or str(exc), exc.errno or 0) from None
    sock.setblocking(False)
    return sock


def bound_address(addr: Address, sock: socket.socket) -> Address:
    """``addr`` with a TCP port 0 replaced by the port the kernel chose."""
    if addr.scheme == "tcp" and addr.port == 0:
        return Address("tcp", host=addr.host, port=sock.getsockname()[1])
    return addr


def private_socket_path(run_dir: str, name: str) -> str:
    """A unix socket path in a root-only directory of the run dir (created on demand)."""
    path = os.path.join(run_dir, "kata-agent")
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return os.path.join(path, f"{name}-{os.getpid()}.sock")


# ---------------------------------------------------------------------------------- connections

class _Sniffer(asyncio.Protocol):
    """Holds a new connection's first bytes until they name its protocol, then hands it over."""

    def __init__(self, front: "Front", serial: bool = False) -> None:
        self.front = front
        self.serial = serial
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.buf[0] == 0:
            self._switch(self.front.ttrpc_connection(restarts=self.serial))
        elif self.buf[:len(HTTP2_PREFACE)] == HTTP2_PREFACE[:len(self.buf)]:
            if len(self.buf) >= len(HTTP2_PREFACE):
                self._switch(_GrpcPipe(self.front))
            elif self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(SNIFF_SECONDS, self.transport.close)
        else:
            log.debug("connection closed: neither ttrpc nor gRPC", extra={"fields": {"first": bytes(self.buf[:16]).hex()}})
            self.transport.close()

    def _switch(self, protocol: asyncio.Protocol) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(bytes(self.buf))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()


class _PipeEnd(asyncio.Protocol):
    """One side of a byte pipe: what it receives goes to ``peer``'s transport."""

    def __init__(self, peer: "_PipeEnd | None" = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # flushes what is buffered first
        return False

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    # flow control: when this side cannot take more, the peer stops reading
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class _GrpcPipe(_PipeEnd):
    """The client's side of a gRPC connection, joined to grpcio once it is up."""

    def __init__(self, front: "Front") -> None:
        super().__init__()
        self.front = front
        self.early = bytearray()
        self.task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        transport.pause_reading()
        self.front.pipes.add(self)
        self.task = asyncio.get_running_loop().create_task(self._join())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early += data
        else:
            super().data_received(data)

    async def _join(self) -> None:
        try:
            path = await self.front.grpc_backend()
            # the backend's end knows its peer from the start: grpcio speaks first (its SETTINGS),
            # and a loop may deliver that before this coroutine resumes
            _, backend = await asyncio.get_running_loop().create_unix_connection(lambda: _PipeEnd(self), path)
        except Exception as exc:  # noqa: BLE001 - this connection fails, the listener lives on
            log.warning("gRPC connection dropped: backend unavailable", extra={"fields": {"error": str(exc)}})
            self.transport.close()
            return
        if self.transport.is_closing():
            backend.transport.close()
            return
        self.peer = backend
        backend.transport.write(bytes(self.early))
        self.early.clear()
        self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        self.front.pipes.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Front:
    """What every listener shares: the service table, open connections, and grpcio once started."""

    def __init__(self, services: Services, run_dir: str) -> None:
        self.services = services
        self.run_dir = run_dir
        self.servers: list[asyncio.AbstractServer] = []
        self.conns: set[ServerConnection] = set()
        self.pipes: set[_GrpcPipe] = set()
        self.ports: list[SerialPort] = []
        self._grpc = None
        self._grpc_path = ""
        self._grpc_start: asyncio.Task | None = None

    async def listen(self, addr: Address) -> Address:
        if addr.scheme == "serial":
            try:
                self.serve_serial(addr.host)
            except OSError as exc:
                raise ListenError(addr, exc.strerror or str(exc), exc.errno or 0) from None
            return addr
        sock = listen_socket(addr)
        try:
            bound = bound_address(addr, sock)
            self.servers.append(await asyncio.get_running_loop().create_server(
                lambda: _Sniffer(self), sock=sock))
        except BaseException:
            sock.close()
            raise
        return bound

    def serve_serial(self, path: str, fd: int = -1) -> SerialPort:
        """Serve the virtio-serial port at ``path`` (or already open as ``fd``)."""
        port = SerialPort(path, lambda: _Sniffer(self, serial=True), fd=fd)
        port.start()
        self.ports.append(port)
        return port

    def ttrpc_connection(self, restarts: bool = False) -> ServerConnection:
        conn = ServerConnection(self.services.dispatch, on_close=lambda: self.conns.discard(conn),
                                restarts=restarts)
        self.conns.add(conn)
        return conn

    async def grpc_backend(self) -> str:
        """The path of grpcio's socket; starts grpcio on the first call."""
        if self._grpc_start is None:
            self._grpc_start = asyncio.get_running_loop().create_task(self._start_grpc())
        return await asyncio.shield(self._grpc_start)

    async def _start_grpc(self) -> str:
        loop = asyncio.get_running_loop()
        # grpcio's import takes long (a second in a TCG guest): not on the event loop
        module = await loop.run_in_executor(None, importlib.import_module, "agent.grpc_server")
        path = private_socket_path(self.run_dir, "grpc")
        _prepare_unix(Address("unix", host=path))
        server = module.GrpcServer(self.services, f"unix:{path}")
        await server.start()
        self._grpc, self._grpc_path = server, path
        log.info("gRPC started", extra={"fields": {"backend": path}})
        return path

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for port in self.ports:
            await port.close()
        for conn in list(self.conns):
            conn.close()
        for pipe in list(self.pipes):
            pipe.transport.close()
        if self._grpc_start is not None:
            try:
                await self._grpc_start
            except Exception:  # noqa: BLE001 - it never served
                pass
        if self._grpc is not None:
            await self._grpc.stop()
            try:
                os.unlink(self._grpc_path)
            except FileNotFoundError:
                pass
        for server in self.servers:
            await server.wait_closed()
