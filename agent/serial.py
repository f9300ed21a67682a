"""A virtio-serial port as a listener, for hosts without vhost-vsock.

The guest side of a named virtio-serial port (``/dev/virtio-ports/NAME``) is one byte stream that
outlives the host's connections: QEMU's chardev socket takes one host connection at a time, and the
guest learns of connects and hang-ups only through the port's state. From virtio_console's poll:
while no host is connected the port reports POLLHUP (and reads return 0 once its data is drained);
with a host connected and nothing to read, it blocks.

So a port serves sessions, one after another:

    wait until the host is connected (POLLHUP gone; polled, since a hung-up port is always ready)
    -> a session: a transport handed to a new protocol (the listener's sniffer: ttrpc or gRPC)
    -> the session ends when a read returns 0 (the host hung up); a half frame dies with it
    -> wait for the next host

When the protocol closes the transport (junk, a half preface), the port cannot drop the host the
way a socket would: it discards input until that host hangs up.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
from collections.abc import Callable

log = logging.getLogger(__name__)

PORTS_DIR = "/dev/virtio-ports"
SYSFS_PORTS = "/sys/class/virtio-ports"
POLL_SECONDS = 0.05  # how often a hung-up port is looked at for a new host
READ_SIZE = 256 << 10
HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10


def port_path(name_or_path: str) -> str:
    """``/dev/virtio-ports/NAME`` for a port name; a path is returned as it is."""
    return name_or_path if "/" in name_or_path else os.path.join(PORTS_DIR, name_or_path)


def find_port(path: str) -> str:
    """The device node for ``path``. udev makes the /dev/virtio-ports/NAME links; a guest without
    udev finds the port by name in sysfs (/sys/class/virtio-ports/vportXpY/name) instead."""
    if os.path.exists(path):
        return path
    name = os.path.basename(path)
    try:
        entries = sorted(os.listdir(SYSFS_PORTS))
    except FileNotFoundError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(SYSFS_PORTS, entry, "name")) as f:
                if f.read().strip() == name:
                    return os.path.join("/dev", entry)
        except OSError:
            continue
    raise FileNotFoundError(errno.ENOENT, f"no virtio-serial port named {name!r}", path)


def host_connected(fd: int) -> bool:
    """True while a host holds the port's other end (no POLLHUP)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return not any(ev & select.POLLHUP for _, ev in p.poll(0))


class SerialSession(asyncio.Transport):
    """One host connection on the port, as an asyncio transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, protocol: asyncio.Protocol, name: str) -> None:
        super().__init__({"peername": name, "sockname": name})
        self._loop = loop
        self._fd = fd
        self._protocol = protocol
        self._out = bytearray()
        self._closing = False      # the protocol is done with this session
        self._reading = True
        self._paused_writer = False
        self.ended: asyncio.Future = loop.create_future()  # set when the host hangs up
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(loop.add_reader, fd, self._readable)

    # reading
    def _readable(self) -> None:
        try:
            data = os.read(self._fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: a pty's hang-up (the tests' stand-in for a port)
            self._end(None if exc.errno == errno.EIO else exc)
            return
        if not data:
            self._end(None)  # the host hung up
        elif not self._closing:
            self._protocol.data_received(data)
        # else: the protocol gave up on this host; what it still sends is dropped

    def pause_reading(self) -> None:
        if self._reading and not self.ended.done():
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self.ended.done():
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def is_reading(self) -> bool:
        return self._reading

    # writing
    def write(self, data) -> None:
        if self._closing or self.ended.done() or not data:
            return
        if not self._out:
            try:
                n = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._end(exc)
                return
            if n == len(data):
                return
            data = memoryview(data)[n:]
            self._loop.add_writer(self._fd, self._writable)
        self._out += data
        if len(self._out) > HIGH_WATER and not self._paused_writer:
            self._paused_writer = True
            self._protocol.pause_writing()

    def _writable(self) -> None:
        try:
            n = os.write(self._fd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(exc)
            return
        del self._out[:n]
        if not self._out:
            self._loop.remove_writer(self._fd)
        if self._paused_writer and len(self._out) <= LOW_WATER:
            self._paused_writer = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return len(self._out)

    def can_write_eof(self) -> bool:
        return False

    # ending
    def is_closing(self) -> bool:
        return self._closing or self.ended.done()

    def close(self) -> None:
        """The protocol is done: it hears connection_lost now; the port drains this host's input
        until the host hangs up, so that the next host starts on a clean stream."""
        if self._closing or self.ended.done():
            return
        self._closing = True
        self._loop.call_soon(self._protocol.connection_lost, None)
        if not self._reading:
            self._reading = True
            self._loop.add_reader(self._fd, self._readable)

    def abort(self) -> None:
        self.close()

    def _end(self, exc: Exception | None) -> None:
        if self.ended.done():
            return
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._out.clear()
        if not self._closing:
            self._closing = True
            self._protocol.connection_lost(exc)
        self.ended.set_result(exc)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol


class SerialPort:
    """Serves one virtio-serial port: sessions one after another, each to a new protocol."""

    def __init__(self, path: str, protocol_factory: Callable[[], asyncio.Protocol], fd: int = -1) -> None:
        """``fd``: the port already open (tests give a pty's master, which hangs up alike)."""
        self.path = path
        self.protocol_factory = protocol_factory
        self.session: SerialSession | None = None
        self._task: asyncio.Task | None = None
        self._fd = fd

    def open(self) -> None:
        """Open the port now, so that a missing device fails the listen, not a later task."""
        device = find_port(self.path)
        self._fd = os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)

    def start(self) -> None:
        if self._fd < 0:
            self.open()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            while not host_connected(self._fd):
                await asyncio.sleep(POLL_SECONDS)
            n += 1
            self.session = SerialSession(loop, self._fd, self.protocol_factory(), f"{self.path}#{n}")
            log.debug("serial host connected", extra={"fields": {"port": self.path, "session": n}})
            exc = await self.session.ended
            log.debug("serial host hung up", extra={"fields": {"port": self.path, "session": n,
                                                              "error": str(exc) if exc else ""}})
            self.session = None
            if exc is not None:  # the port itself failed: do not spin on it
                await asyncio.sleep(POLL_SECONDS)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.session is not None:
            self.session._end(None)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
