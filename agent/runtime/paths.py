"""Resolve a path inside a root directory as if the root were ``/``: no escape through ``..`` or symlinks."""

from __future__ import annotations

import errno
import os

MAX_SYMLINKS = 255


def secure_join(root: str, unsafe: str) -> str:
    """``root`` + ``unsafe`` with every symlink resolved relative to ``root``.

    ``..`` never climbs above ``root``; a symlink to ``/x`` means ``root/x``. Missing components are
    kept as they are (the caller may create them). The result always starts with ``root``.
    """
    root = os.path.normpath(root)
    pending = [c for c in unsafe.split("/") if c not in ("", ".")]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            target = os.readlink(candidate)
        except OSError as exc:  # not a symlink, or missing
            if exc.errno not in (errno.EINVAL, errno.ENOENT, errno.ENOTDIR):
                raise
            done.append(part)
            continue
        links += 1
        if links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, f"{unsafe}: too many symlinks")
        if target.startswith("/"):
            done = []
        pending[:0] = [c for c in target.split("/") if c not in ("", ".")]
    return os.path.join(root, *done)


def mkdir_all(root: str, path: str, mode: int = 0o755) -> str:
    """Resolve ``path`` inside ``root`` and create the missing directories; returns the host path."""
    full = secure_join(root, path)
    os.makedirs(full, mode=mode, exist_ok=True)
    return full
