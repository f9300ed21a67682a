"""Carry out a Plan: write each value, turn kernel refusals into errors that name the field."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import Internal, InvalidArgument
from agent.runtime.cgroups import files
from agent.runtime.cgroups.plan import Plan, Write

log = logging.getLogger("agent.cgroups")

# Files that hold one value, which can be read back and written again to undo an update.
_RESTORABLE = {
    "memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.soft_limit_in_bytes",
    "memory.swappiness", "memory.max", "memory.low", "memory.swap.max", "cpu.shares",
    "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.rt_period_us", "cpu.rt_runtime_us",
    "cpu.weight", "cpu.max", "cpuset.cpus", "cpuset.mems", "pids.max", "blkio.weight",
}


@dataclass
class Undo:
    """Old values of the files an update changed, to put back if a later write fails."""

    saved: list[tuple[str, str]] = field(default_factory=list)

    def remember(self, path: str, name: str) -> None:
        if name in _RESTORABLE or (name.startswith("hugetlb.") and "rsvd" not in name):
            old = files.read_opt(path)
            if old is not None:
                self.saved.append((path, old.strip()))

    def run(self) -> None:
        # Two passes: v1 memory limits only accept some orders (limit <= memsw).
        for _ in range(2):
            failed = []
            for path, old in reversed(self.saved):
                try:
                    files.write(path, old)
                except OSError:
                    failed.append((path, old))
            if not failed:
                return
            self.saved = list(reversed(failed))
        log.warning("cgroup update: could not restore %s", [p for p, _ in self.saved])


def _error(w: Write, prefix: str, value: str, path: str, exc: OSError) -> Exception:
    where = f"{prefix}.{w.field}"
    if exc.errno == errno.EBUSY:
        return InvalidArgument(f"{where}: {value!r} {w.busy} ({os.path.basename(path)})")
    if exc.errno in (errno.EINVAL, errno.ERANGE, errno.EOVERFLOW, errno.ENOSPC):
        return InvalidArgument(f"{where}: {value!r} rejected by the kernel "
                               f"({os.path.basename(path)}: {os.strerror(exc.errno)})")
    return Internal(f"{where}: writing {path}: {os.strerror(exc.errno or 0)}")


def _write_one(w: Write, dir_of: Callable[[str], str], prefix: str, undo: Undo | None,
               out: files.Writer) -> None:
    """Write the first of ``w.targets`` whose file exists (opening it is the existence check;
    what must be read first, the current quota or the value to restore, reads nothing when the
    file is missing)."""
    directory = dir_of(w.controller)
    for name, value in w.targets:
        path = os.path.join(directory, name)
        if w.keep_quota:
            current = (files.read_opt(path) or "max").split()
            value = f"{current[0] if current else 'max'} {value}"
        if undo is not None:
            undo.remember(path, name)
        try:
            if not out.open(path):
                continue
            out.write(path, value)
        except OSError as exc:
            raise _error(w, prefix, value, path, exc) from None
        return
    if w.optional:
        log.warning("%s.%s: %s not available here; skipped", prefix, w.field, w.file)
        return
    raise InvalidArgument(f"{prefix}.{w.field}: not supported by this kernel ({w.file} is missing)")


def apply(plan: Plan, dir_of: Callable[[str], str], prefix: str, undo: Undo | None = None) -> None:
    """Write every value in order. ``swap_on_einval`` writes that fail with EINVAL are retried
    after the write that follows them (v1 memory limit vs memsw, cfs period vs quota)."""
    for note in plan.notes:
        log.info("%s.%s", prefix, note)
    writes, i = plan.writes, 0
    out = files.Writer()
    try:
        while i < len(writes):
            w = writes[i]
            if w.swap_on_einval and i + 1 < len(writes):
                try:
                    _write_one(w, dir_of, prefix, undo, out)
                except InvalidArgument:
                    _write_one(writes[i + 1], dir_of, prefix, undo, out)
                    _write_one(w, dir_of, prefix, undo, out)
                    i += 2
                    continue
            else:
                _write_one(w, dir_of, prefix, undo, out)
            i += 1
    finally:
        out.close()
