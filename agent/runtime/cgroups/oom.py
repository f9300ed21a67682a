"""OOM-kill notifications for the cgroups the manager created, delivered as owner strings.

v1: an eventfd registered for memory.oom_control through cgroup.event_control; the kernel
signals it on every OOM in the cgroup (and once more when the cgroup is removed, which is why the
watch is dropped before rmdir). v2: memory.events gets a "modified" inotify event when a counter
changes; an increase of ``oom_kill`` is an OOM kill. Both run in the asyncio loop through
``loop.add_reader``: no threads, no polling.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from dataclasses import dataclass

from agent import linux
from agent.linux import IN_IGNORED, IN_MODIFY
from agent.runtime.cgroups import files

log = logging.getLogger("agent.cgroups")

_EVENT = struct.Struct("iIII")
QUEUE_MAX = 1024


@dataclass
class Watch:
    owner: str
    directory: str
    version: int
    fd: int = -1  # v1: the eventfd
    wd: int = -1  # v2: the inotify watch descriptor
    oom_kills: int = 0  # v2: the last oom_kill count seen
    active: bool = True


class _Inotify:
    """An inotify instance: its fd, watches added and removed."""

    def __init__(self) -> None:
        self.fd = linux.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)

    def add(self, path: str, mask: int) -> int:
        return linux.inotify_add_watch(self.fd, path, mask)

    def remove(self, wd: int) -> None:
        try:
            linux.inotify_rm_watch(self.fd, wd)
        except OSError:  # EINVAL: the kernel dropped it already (the file went away)
            pass

    def events(self) -> list[tuple[int, int]]:
        """(wd, mask) of every queued event."""
        try:
            data = os.read(self.fd, 64 * 1024)
        except BlockingIOError:
            return []
        out, pos = [], 0
        while pos + _EVENT.size <= len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, pos)
            out.append((wd, mask))
            pos += _EVENT.size + length
        return out

    def close(self) -> None:
        os.close(self.fd)


def oom_kill_count(directory: str) -> int:
    return files.read_kv(os.path.join(directory, "memory.events")).get("oom_kill", 0)


class OomWatcher:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: _Inotify | None = None
        self._by_wd: dict[int, Watch] = {}
        self._watches: list[Watch] = []

    def _bind(self) -> asyncio.AbstractEventLoop | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if self._loop is None:
            self._loop = loop
        return self._loop if self._loop is loop else None

    def queue(self) -> asyncio.Queue[str]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    def _emit(self, watch: Watch) -> None:
        q = self.queue()
        if q.qsize() >= QUEUE_MAX:
            q.get_nowait()
            log.warning("OOM event queue full; dropped the oldest event")
        log.info("OOM kill in cgroup", extra={"fields": {"container_id": watch.owner,
                                                         "cgroup": watch.directory}})
        q.put_nowait(watch.owner)

    def watch(self, directory: str, version: int, owner: str) -> Watch | None:
        """Start watching; None when no event loop runs here (nothing to deliver to)."""
        loop = self._bind()
        if loop is None:
            log.debug("no running event loop: OOM events of %s are not watched", directory)
            return None
        watch = Watch(owner, directory, version)
        if version == 1:
            self._watch_v1(loop, watch)
        else:
            self._watch_v2(loop, watch)
        self._watches.append(watch)
        return watch

    def _watch_v1(self, loop: asyncio.AbstractEventLoop, watch: Watch) -> None:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(os.path.join(watch.directory, "memory.oom_control"),
                          os.O_RDONLY | os.O_CLOEXEC)
            try:
                files.write(os.path.join(watch.directory, "cgroup.event_control"), f"{efd} {ofd}")
            finally:
                os.close(ofd)
        except BaseException:
            os.close(efd)
            raise
        watch.fd = efd
        loop.add_reader(efd, self._on_eventfd, watch)

    def _on_eventfd(self, watch: Watch) -> None:
        try:
            os.eventfd_read(watch.fd)
        except BlockingIOError:
            return
        if watch.active and os.path.isdir(watch.directory):
            self._emit(watch)

    def _watch_v2(self, loop: asyncio.AbstractEventLoop, watch: Watch) -> None:
        if self._inotify is None:
            self._inotify = _Inotify()
            loop.add_reader(self._inotify.fd, self._on_inotify)
        watch.oom_kills = oom_kill_count(watch.directory)
        watch.wd = self._inotify.add(os.path.join(watch.directory, "memory.events"), IN_MODIFY)
        self._by_wd[watch.wd] = watch

    def _on_inotify(self) -> None:
        assert self._inotify is not None
        for wd, mask in self._inotify.events():
            watch = self._by_wd.get(wd)
            if watch is None:
                continue
            if mask & IN_IGNORED:
                self._by_wd.pop(wd, None)
                continue
            count = oom_kill_count(watch.directory)
            if count > watch.oom_kills and watch.active:
                self._emit(watch)
            watch.oom_kills = max(count, watch.oom_kills)

    def unwatch(self, watch: Watch | None) -> None:
        if watch is None or not watch.active:
            return
        watch.active = False
        if watch in self._watches:
            self._watches.remove(watch)
        if watch.version == 1 and watch.fd >= 0:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(watch.fd)
            os.close(watch.fd)
            watch.fd = -1
        elif watch.wd >= 0 and self._inotify is not None:
            self._by_wd.pop(watch.wd, None)
            self._inotify.remove(watch.wd)
            watch.wd = -1

    async def next_event(self) -> str:
        return await self.queue().get()

    def close(self) -> None:
        for watch in list(self._watches):
            self.unwatch(watch)
        if self._inotify is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
