"""The start-up timeline of the guest's PID 1, written into the kernel's log with the kernel's clock.

``/init`` calls ``start()`` as its first statement; from then on ``mark("name")`` records a moment
and an import watcher records how long each import of a package or agent module takes. Every
record is one line written to ``/dev/kmsg`` at debug level (``<7>``): it lands in the kernel's ring
buffer next to the kernel's own messages and with the same clock, and the console (loglevel 4)
never sees it. ``bench/vm_boot.py`` reads it back with ``dmesg`` and lays out the timeline.

Records made before ``/dev`` is mounted wait in memory and go out with the first record after.
Every line carries the monotonic time at which it was taken::

    kata-boot: mark init-start mono=1.532101 wall=1764669000.123456
    kata-boot: import grpc mono=2.801000 s=0.412000 in=agent.server

The cost is a clock read and a short write per record, and for the import watcher a Python call
for each module imported (one dictionary-free string test for most of them). Outside the guest
(``start()`` never called) ``mark`` is a flag test. Forked children stop recording.
"""

from __future__ import annotations

import _thread
import os
import sys
import time

ENV = "KATA_AGENT_BOOTTRACE"  # "1": processes started by the agent (the spawner) record too
KMSG = "/dev/kmsg"
MIN_IMPORT = 0.010  # imports that take less are not written

_enabled = os.environ.get(ENV) == "1"
_pending: list[bytes] = []
_lock = _thread.allocate_lock()  # the agent imports part of itself in a thread (agent.wiring)


def enabled() -> bool:
    return _enabled


def start(t0: float | None = None) -> None:
    """Begin recording (as the guest's /init): the first mark carries both clocks."""
    global _enabled
    _enabled = True
    os.environ[ENV] = "1"
    os.register_at_fork(after_in_child=_stop_in_child)
    mark("init-start", t0, wall=f"{time.time() - (time.monotonic() - t0 if t0 else 0):.6f}")
    if not any(isinstance(f, _ImportWatch) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportWatch())


def mark(name: str, t: float | None = None, **fields: object) -> None:
    """Record that ``name`` happened at monotonic time ``t`` (now by default)."""
    if not _enabled:
        return
    t = time.monotonic() if t is None else t
    extra = "".join(f" {k}={v}" for k, v in fields.items())
    _write(f"<7>kata-boot: mark {name} mono={t:.6f} pid={os.getpid()}{extra}\n".encode())


def _write(line: bytes) -> None:
    with _lock:
        _write_locked(line)


def _write_locked(line: bytes) -> None:
    _pending.append(line)
    while _pending:
        # Opened for each record: the kernel lets one open /dev/kmsg write 10 records per 5 s
        # and drops the rest (unless printk.devkmsg=on); each open gets its own allowance.
        try:
            fd = os.open(KMSG, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:  # no /dev yet: kept for the next record
            return
        try:
            os.write(fd, _pending[0])
        except OSError:
            pass
        finally:
            os.close(fd)
        del _pending[0]


def _stop_in_child() -> None:
    global _enabled, _lock
    _enabled = False
    _pending.clear()
    _lock = _thread.allocate_lock()  # another thread may have held it at the fork


# --------------------------------------------------------------------------- the import watcher

def _watched(name: str) -> bool:
    # A top-level package (grpc, pyroute2, asyncio, ...) or one of the agent's modules.
    return "." not in name or name.startswith("agent.")


class _ImportWatch:
    """A meta path finder that finds nothing itself: for a watched module it asks the finders
    behind it and wraps the loader it gets, to time the module's execution (its own imports
    included). The loader is put back once the module has run."""

    def __init__(self) -> None:
        self._local = _thread._local()  # per thread (the agent imports part of itself aside)

    @property
    def _stack(self) -> list[str]:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = []
            return self._local.stack

    @property
    def _asking(self) -> bool:
        return getattr(self._local, "asking", False)

    @_asking.setter
    def _asking(self, value: bool) -> None:
        self._local.asking = value

    def find_spec(self, name, path=None, target=None):
        if not _enabled or self._asking or not _watched(name):
            return None
        self._asking = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self._asking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _TimedLoader(spec.loader, self)
        return spec

    def invalidate_caches(self) -> None:
        pass


class _TimedLoader:
    def __init__(self, loader, watch: _ImportWatch) -> None:
        self._loader = loader
        self._watch = watch

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        name = module.__name__
        stack = self._watch._stack
        parent = stack[-1] if stack else "-"
        stack.append(name)
        t0 = time.monotonic()
        try:
            self._loader.exec_module(module)
        finally:
            t1 = time.monotonic()
            stack.pop()
            module.__loader__ = self._loader
            if getattr(module, "__spec__", None) is not None and module.__spec__.loader is self:
                module.__spec__.loader = self._loader
            if _enabled and t1 - t0 >= MIN_IMPORT:
                _write(f"<7>kata-boot: import {name} mono={t0:.6f} s={t1 - t0:.6f} "
                       f"in={parent}\n".encode())
