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
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)  # closes on failure
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock
    cls, family = socket.socket, socket.AF_UNIX
    if addr.scheme == "unix":
        target = "\0" + addr.host if addr.abstract else addr.host
    elif addr.scheme == "vsock":
        family, target = socket.AF_VSOCK, (addr.cid, addr.port)
    elif addr.scheme == "serial":
        keep_serial_gap(addr.host)
        cls, target = _SerialSocket, addr.host
    else:
        raise ValueError(f"{addr}: cannot dial scheme {addr.scheme!r}")
    sock = cls(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:  # a readiness probe dials many times: a failed attempt closes its socket at once
        sock.settimeout(timeout)
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    if addr.scheme == "serial":
        sock.path = addr.host  # from here on its close is remembered
    sock.settimeout(None)
    return sock
