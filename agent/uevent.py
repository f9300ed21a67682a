"""The NETLINK_KOBJECT_UEVENT listener: kernel device events, kept so that early ones count.

Started with the agent (agent.rpc.sandbox setup). ``wait_for(match, present)`` first asks
``present()`` (sysfs/dev: the device may have been there before the agent started), then looks
at the recent events, then waits for new ones. The check and the registration happen in the
event loop without an await in between, so no event can slip through.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1
RECENT_MAX = 1024
RECV_BUF = 1 << 20


@dataclass(frozen=True)
class Uevent:
    action: str
    devpath: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def devname(self) -> str:
        return self.env.get("DEVNAME", "")


def parse(data: bytes) -> Uevent | None:
    """A kernel uevent datagram: ``action@devpath\\0KEY=VALUE\\0...``; None for anything else."""
    parts = data.split(b"\0")
    head = parts[0].decode(errors="replace")
    if "@" not in head:
        return None  # udev's own re-broadcasts start with "libudev"
    action, _, devpath = head.partition("@")
    env: dict[str, str] = {}
    for item in parts[1:]:
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return Uevent(env.get("ACTION", action), env.get("DEVPATH", devpath), env)


Match = Callable[[Uevent], Any]


@dataclass
class _Waiter:
    match: Match
    future: asyncio.Future


class UeventListener:
    def __init__(self, recent_max: int = RECENT_MAX) -> None:
        self.recent: collections.deque[Uevent] = collections.deque(maxlen=recent_max)
        self._waiters: list[_Waiter] = []
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received = 0

    def start(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                             NETLINK_KOBJECT_UEVENT)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUF)
            sock.bind((0, KERNEL_GROUP))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def stop(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for w in self._waiters:
            if not w.future.done():
                w.future.cancel()
        self._waiters.clear()

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(RECV_BUF)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ENOBUFS: events were lost; waiters re-check sysfs
                log.warning("uevent socket: %s", exc)
                self._recheck_all()
                return
            event = parse(data)
            if event is not None:
                self.feed(event)

    def feed(self, event: Uevent) -> None:
        """Record ``event`` and wake every waiter it satisfies."""
        self.received += 1
        self.recent.append(event)
        for w in list(self._waiters):
            self._try(w, event)

    def _try(self, w: _Waiter, event: Uevent | None) -> None:
        if w.future.done():
            return
        try:
            result = w.match(event)
        except Exception as exc:  # noqa: BLE001 - a broken matcher fails its own wait
            w.future.set_exception(exc)
            return
        if result:
            w.future.set_result(result)

    def _recheck_all(self) -> None:
        for w in list(self._waiters):
            self._try(w, None)

    async def wait_for(self, match: Match, timeout: float) -> Any:
        """The first truthy ``match(event)``: ``match(None)`` asks sysfs, then recent events count.

        Raises TimeoutError after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        w = _Waiter(match, loop.create_future())
        self._try(w, None)
        for event in list(self.recent):
            self._try(w, event)
        if w.future.done():
            return w.future.result()
        self._waiters.append(w)
        try:
            return await asyncio.wait_for(w.future, timeout)
        finally:
            self._waiters.remove(w)
