"""ttrpc, containerd's small RPC protocol: frames, a server connection, and two clients.

A connection carries frames: a 10-byte header (data length and stream id as big-endian u32, then
a type byte and a flags byte) and at most 4 MiB of data. A request frame (type 1) holds a
``ttrpc.Request`` (service, method, payload, timeout_nano, metadata); the answer is a response
frame (type 2) on the same stream id holding a ``ttrpc.Response`` (a google.rpc.Status and the
reply's payload). Clients number their streams with odd, increasing ids. Requests on one
connection run concurrently and are answered in the order they finish, so a long poll
(WaitProcess, ReadStdout) does not hold up the calls behind it.

This module has no service of its own and imports no grpc: a server is given one coroutine,
``dispatch(service, method, payload, deadline)``, that returns the reply's bytes or raises
``Status``. The guest agent and the host side (library, CLI, containerd shim) share it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable

from google.protobuf.message import DecodeError

from agent.errors import Code
from agent.protocols import ttrpc_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
MAX_DATA = 4 << 20
REQUEST, RESPONSE, DATA = 1, 2, 3
# Requests of one connection in flight at once; more are refused with RESOURCE_EXHAUSTED.
MAX_IN_FLIGHT = 1024
VSOCK = getattr(socket, "AF_VSOCK", -1)
# A blocking client's longest single wait in recv before it looks at its deadline again.
READ_TICK = 1.0


class Status(Exception):
    """A call that ends with a status other than OK, on either side of the connection."""

    def __init__(self, code: int, message: str) -> None:
        try:
            code = Code(code)
        except ValueError:
            code = Code.UNKNOWN
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(Status):
    """The connection ended before the reply came."""

    def __init__(self, message: str = "connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)


def frame(stream_id: int, kind: int, data: bytes) -> bytes:
    return HEADER.pack(len(data), stream_id, kind, 0) + data


def response(status: Code, message: str = "", payload: bytes = b"") -> bytes:
    reply = ttrpc_pb2.Response(payload=payload)
    reply.status.code = status
    if message:
        reply.status.message = message
    return reply.SerializeToString()


class FrameReader:
    """Cuts a byte stream into frames. Data of an oversized frame is skipped, not buffered:
    ``feed`` yields ``(stream_id, kind, None)`` for it once its header is read."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0

    def feed(self, data: bytes):
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        buf = self._buf
        buf += data
        start = 0
        while len(buf) - start >= HEADER.size:
            length, stream_id, kind, _flags = HEADER.unpack_from(buf, start)
            body = start + HEADER.size
            if length > MAX_DATA:
                have = len(buf) - body
                self._skip = max(0, length - have)
                start = min(len(buf), body + length)
                yield stream_id, kind, None
                continue
            end = body + length
            if end > len(buf):
                break
            yield stream_id, kind, bytes(buf[body:end])
            start = end
        if start:
            del buf[:start]

    @property
    def pending(self) -> int:
        """Bytes of a frame begun but not complete (0 between frames)."""
        return len(self._buf) + self._skip


# ---------------------------------------------------------------------------------- server side

Dispatch = Callable[[str, str, bytes, "float | None"], Awaitable[bytes]]


class ServerConnection(asyncio.Protocol):
    """One client's connection: every request runs as a task of its own.

    ``dispatch(service, method, payload, deadline)`` is awaited for each request; ``deadline`` is
    the loop time by which the client gives up (None: no deadline). A task still running when the
    deadline passes is cancelled and answered DEADLINE_EXCEEDED; when the connection closes, its
    tasks are cancelled.

    ``restarts``: the byte stream outlives its clients (a virtio-serial port), so a request on
    stream 1 after others means a new client: what the old one left running is cancelled and
    stream ids count anew.
    """

    def __init__(self, dispatch: Dispatch, name: str = "ttrpc", on_close: Callable[[], None] | None = None,
                 restarts: bool = False) -> None:
        self.dispatch = dispatch
        self.restarts = restarts
        self.name = name
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.frames = FrameReader()
        self.tasks: dict[int, asyncio.Task] = {}
        self.last_stream = 0
        self._writable: asyncio.Future | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for stream_id, kind, body in self.frames.feed(data):
            if kind != REQUEST:
                continue  # responses and stream data have no meaning for a unary server
            if self.restarts and stream_id == 1 and self.last_stream >= 1:
                self._new_client()
            if body is None:
                self._answer(stream_id, Code.RESOURCE_EXHAUSTED,
                             f"message of stream {stream_id} exceeds the maximum of {MAX_DATA} bytes")
            elif stream_id % 2 == 0 or stream_id <= self.last_stream:
                self._answer(stream_id, Code.INVALID_ARGUMENT,
                             f"stream id {stream_id}: client streams are odd and increasing")
            elif len(self.tasks) >= MAX_IN_FLIGHT:
                self.last_stream = stream_id
                self._answer(stream_id, Code.RESOURCE_EXHAUSTED,
                             f"more than {MAX_IN_FLIGHT} requests in flight on this connection")
            else:
                self.last_stream = stream_id
                self._start(stream_id, body)

    def eof_received(self) -> bool:
        return False  # the client is done sending: close, which cancels what still runs

    def _new_client(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        self.last_stream = 0

    def connection_lost(self, exc) -> None:
        self.closed = True
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self.on_close is not None:
            self.on_close()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # requests
    def _start(self, stream_id: int, body: bytes) -> None:
        try:
            request = ttrpc_pb2.Request.FromString(body)
        except DecodeError as exc:
            self._answer(stream_id, Code.INVALID_ARGUMENT, f"request is not a valid ttrpc.Request: {exc}")
            return
        task = asyncio.get_running_loop().create_task(self._run(stream_id, request))
        self.tasks[stream_id] = task

    async def _run(self, stream_id: int, request) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    payload = await self.dispatch(request.service, request.method, request.payload, deadline)
            except TimeoutError:
                raise Status(Code.DEADLINE_EXCEEDED,
                             f"{request.service}/{request.method}: deadline of "
                             f"{request.timeout_nano / 1e9:g} s exceeded") from None
            reply = response(Code.OK, payload=payload)
            if len(reply) > MAX_DATA:
                raise Status(Code.RESOURCE_EXHAUSTED,
                             f"{request.method}: reply of {len(reply)} bytes exceeds the maximum of {MAX_DATA}")
        except Status as exc:
            reply = response(exc.code, exc.message)
        except asyncio.CancelledError:
            return  # connection closed (no one to answer) or server stopping
        except Exception as exc:  # noqa: BLE001 - a dispatcher bug still gets an answer
            log.exception("ttrpc dispatch failed", extra={"fields": {"method": request.method}})
            reply = response(Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            if self.tasks.get(stream_id) is asyncio.current_task():  # not a new client's stream
                del self.tasks[stream_id]
        await self._send(stream_id, reply)

    def _answer(self, stream_id: int, code: Code, message: str) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(frame(stream_id, RESPONSE, response(code, message)))

    async def _send(self, stream_id: int, reply: bytes) -> None:
        if self.closed or self.transport is None:
            return
        self.transport.write(frame(stream_id, RESPONSE, reply))
        if self._writable is not None and not self._writable.done():
            await self._writable

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# ---------------------------------------------------------------------------------- client side

class _Call:
    __slots__ = ("done", "reply", "error", "wake")

    def __init__(self) -> None:
        self.done = False
        self.reply: bytes | None = None
        self.error: Status | None = None
        # set when done, or when it is this call's turn to read; made only if the call must wait
        self.wake: threading.Event | None = None

    def notify(self) -> None:
        if self.wake is None:
            self.wake = threading.Event()
        self.wake.set()


def _request(service: str, method: str, payload: bytes, timeout: float | None,
             metadata: dict[str, str] | None) -> bytes:
    req = ttrpc_pb2.Request(service=service, method=method, payload=payload)
    if timeout is not None and timeout > 0:
        req.timeout_nano = int(timeout * 1e9)
    for key, value in (metadata or {}).items():
        req.metadata.add(key=key, value=value)
    return req.SerializeToString()


def _result(body: bytes | None) -> bytes:
    """The reply payload of a response frame, or the Status it carries."""
    if body is None:
        raise Status(Code.RESOURCE_EXHAUSTED, f"response exceeds the maximum of {MAX_DATA} bytes")
    try:
        reply = ttrpc_pb2.Response.FromString(body)
    except DecodeError as exc:
        raise Status(Code.INTERNAL, f"response is not a valid ttrpc.Response: {exc}") from None
    if reply.status.code != Code.OK:
        raise Status(reply.status.code, reply.status.message)
    return reply.payload


class Client:
    """A blocking client for one connected stream socket; any number of threads may call at once.

    No thread of its own: one waiting caller at a time reads the socket for everyone and hands
    each reply to its caller; when it has its own, it hands the reading to another waiting
    caller. A lone caller thus gets its answer without a thread switch.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._ids = itertools.count(1, 2)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._reading = False
        self._frames = FrameReader()
        self._closed: Status | None = None
        self._rcvtimeo = 0  # microseconds

    def call(self, service: str, method: str, payload: bytes, *, timeout: float | None = None,
             metadata: dict[str, str] | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        body = _request(service, method, payload, timeout, metadata)
        call = _Call()
        stream_id = 0
        try:
            with self._send_lock:  # ids go out in the order they are taken
                with self._lock:
                    if self._closed is not None:
                        raise self._closed
                    stream_id = next(self._ids)
                    self._calls[stream_id] = call
                self.sock.sendall(HEADER.pack(len(body), stream_id, REQUEST, 0) + body)
            self._wait(call, deadline)
        except OSError as exc:
            self._fail(ConnectionClosed(f"connection lost: {exc}"))
        finally:
            with self._lock:
                self._calls.pop(stream_id, None)
        if not call.done:
            raise Status(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no reply within {timeout:g} s")
        if call.error is not None:
            raise call.error
        return _result(call.reply)

    def _wait(self, call: _Call, deadline: float | None) -> None:
        while True:
            with self._lock:
                if call.done:
                    return
                reader = not self._reading
                self._reading = True
                if not reader and call.wake is None:
                    call.wake = threading.Event()
            if not reader:
                left = None if deadline is None else deadline - time.monotonic()
                woken = (left is None or left > 0) and call.wake.wait(left)
                call.wake.clear()
                if not woken:
                    with self._lock:
                        if not self._reading:  # the turn to read may have come to this call
                            self._hand_over(call)
                    return
                continue
            try:
                finished = self._read_until(call, deadline)
            finally:
                with self._lock:
                    self._reading = False
                    self._hand_over(call)
            if not finished:
                return

    def _hand_over(self, leaving: _Call) -> None:
        """Wake one other waiting call to read the socket (with self._lock held)."""
        for other in self._calls.values():
            if other is not leaving and not other.done:
                other.notify()
                return

    def _read_until(self, call: _Call, deadline: float | None) -> bool:
        """Read frames until ``call`` has its reply (True) or the deadline passes (False).

        The socket's SO_RCVTIMEO bounds each recv (READ_TICK, or what is left when less), so a
        read needs no poll before it and the deadline is still kept. (Python sets no SO_RCVTIMEO
        on vsock sockets: there a poll comes first.)
        """
        while not call.done:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                if self.sock.family == VSOCK:
                    if not select.select([self.sock], [], [], left)[0]:
                        return False
                else:
                    self._recv_timeout(min(left, READ_TICK))
            elif self._rcvtimeo:
                self._recv_timeout(0)
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, TimeoutError):
                continue
            if not data:
                self._fail(ConnectionClosed())
                return True
            with self._lock:
                for stream_id, kind, body in self._frames.feed(data):
                    other = self._calls.get(stream_id)
                    if kind == RESPONSE and other is not None and not other.done:
                        other.reply, other.done = body, True
                        if other is not call:
                            other.notify()
        return True

    def _recv_timeout(self, seconds: float) -> None:
        """Set SO_RCVTIMEO (0: none) when it differs from what is set; whole milliseconds, at least 1."""
        micros = 0 if seconds <= 0 else max(1000, int(seconds * 1000) * 1000)
        if micros != self._rcvtimeo:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 struct.pack("ll", micros // 1_000_000, micros % 1_000_000))
            self._rcvtimeo = micros

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def alive(self) -> bool:
        """False when the peer has hung up (looked at without blocking, when no call is waiting).

        With no call waiting, whatever the socket holds are late answers to calls that gave up
        at their deadline (the server answers DEADLINE_EXCEEDED about when the caller leaves): they
        are read and dropped, so that a hang-up behind them is seen."""
        while True:
            with self._lock:
                if self._closed is not None:
                    return False
                if self._calls or self._reading:
                    return True
                try:
                    data = self.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return True
                except OSError:
                    data = b""
                if not data:
                    self._closed = ConnectionClosed()
                    return False
                for _ in self._frames.feed(data):
                    pass  # nobody waits for them

    def _fail(self, error: Status) -> None:
        with self._lock:
            self._closed = error
            for call in self._calls.values():
                if not call.done:
                    call.error, call.done = error, True
                    call.notify()

    def close(self) -> None:
        self._fail(ConnectionClosed("client closed"))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class AsyncClient(asyncio.Protocol):
    """An asyncio client: ``await client.call(service, method, payload)`` from any task."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._ids = itertools.count(1, 2)
        self._calls: dict[int, asyncio.Future] = {}
        self._frames = FrameReader()
        self._closed: Status | None = None

    @classmethod
    async def connect(cls, sock: socket.socket) -> "AsyncClient":
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        _, client = await loop.create_connection(cls, sock=sock)
        return client

    @classmethod
    async def connect_unix(cls, path: str) -> "AsyncClient":
        _, client = await asyncio.get_running_loop().create_unix_connection(cls, path)
        return client

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for stream_id, kind, body in self._frames.feed(data):
            fut = self._calls.pop(stream_id, None)
            if kind == RESPONSE and fut is not None and not fut.done():
                try:
                    fut.set_result(_result(body))
                except Status as exc:
                    fut.set_exception(exc)

    def connection_lost(self, exc) -> None:
        self._closed = ConnectionClosed(f"connection lost: {exc}" if exc else "connection closed")
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(self._closed)
        self._calls.clear()

    async def call(self, service: str, method: str, payload: bytes, *, timeout: float | None = None,
                   metadata: dict[str, str] | None = None) -> bytes:
        if self._closed is not None or self.transport is None:
            raise self._closed or ConnectionClosed()
        stream_id = next(self._ids)
        fut = self._calls[stream_id] = asyncio.get_running_loop().create_future()
        self.transport.write(frame(stream_id, REQUEST, _request(service, method, payload, timeout, metadata)))
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise Status(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no reply within {timeout:g} s") from None
        finally:
            self._calls.pop(stream_id, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
