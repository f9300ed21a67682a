"""Connecting to the agent: ``dial(parse_address("serial:///run/vm/agent.sock"))``.

Kept free of grpcio, so that a readiness probe (qemu/vm.py) imports little.
"""

from __future__ import annotations

import socket
import time

from agent.config import Address

# A virtio-serial channel carries one host connection at a time, and the guest learns of a
# hang-up only from the port's state: a new connection right after one closed could reach the
# guest before it saw the hang-up. Connections to one channel keep this gap in between.
SERIAL_GAP = 0.1
_serial_hangups: dict[str, float] = {}


class _SerialSocket(socket.socket):
    """A connection to a virtio-serial channel's host socket; its close is remembered."""

    path = ""  # set once connected

    def close(self) -> None:
        if self.fileno() >= 0:
            serial_hung_up(self.path)
        super().close()


def serial_hung_up(path: str) -> None:
    """Note that a connection to the serial channel at ``path`` just closed."""
    if path:
        _serial_hangups[path] = time.monotonic()


def keep_serial_gap(path: str) -> None:
    """Wait until SERIAL_GAP has passed since the last connection to ``path`` closed."""
    wait = _serial_hangups.get(path, -SERIAL_GAP) + SERIAL_GAP - time.monotonic()
    if wait > 0:
        time.sleep(wait)


def dial(addr: Address, timeout: float | None = None) -> socket.socket:
    """A connected stream socket to ``addr`` (for ``serial://``, to QEMU's chardev socket)."""
    if addr.scheme == "tcp":
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    elif addr.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        sock.connect("\0" + addr.host if addr.abstract else addr.host)
    elif addr.scheme == "vsock":
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        sock.connect((addr.cid, addr.port))
    elif addr.scheme == "serial":
        keep_serial_gap(addr.host)
        sock = _SerialSocket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(addr.host)
        except OSError:
            sock.close()
            raise
        sock.path = addr.host
    else:
        raise ValueError(f"{addr}: cannot dial scheme {addr.scheme!r}")
    sock.settimeout(None)
    return sock
