"""Paths from requests, resolved inside a root: no ``..``, no symlink walking out.

Directories are walked one component at a time with ``O_NOFOLLOW``, so a symlink planted anywhere
on the way is refused instead of followed; missing directories are created on the way and
reported so that a failure can remove exactly what was created.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from agent.errors import InvalidArgument

CANONICAL_RUN = "/run"


def lexical_under(path: str, root: str, what: str) -> list[str]:
    """The components of absolute ``path`` below ``root``; refuses ``..``, relative paths and escapes."""
    if not path:
        raise InvalidArgument(f"{what}: empty")
    if "\0" in path:
        raise InvalidArgument(f"{what}: contains a NUL byte")
    if not path.startswith("/"):
        raise InvalidArgument(f"{what}: {path!r} is not absolute")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"{what}: {path!r} contains '..'")
    root_parts = [p for p in root.split("/") if p not in ("", ".")]
    if parts[: len(root_parts)] != root_parts or len(parts) == len(root_parts):
        raise InvalidArgument(f"{what}: {path!r} must be under {root}/")
    return parts[len(root_parts):]


def unlink_missing(path: str) -> None:
    """Remove a file that may already be gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def map_run_dir(path: str, run_dir: str) -> str:
    """Map a guest path under /run (as the host names it) into the agent's run_dir."""
    run_dir = run_dir.rstrip("/") or "/"
    if run_dir == CANONICAL_RUN or not (path == CANONICAL_RUN or path.startswith(CANONICAL_RUN + "/")):
        return path
    return run_dir + path[len(CANONICAL_RUN):]


@dataclass
class Walk:
    """An open directory fd at the end of a walk, and the directories the walk created."""

    fd: int
    path: str
    created: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_dir(name: str, dir_fd: int, where: str) -> int:
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if exc.errno == errno.ELOOP or stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise InvalidArgument(f"{where}: is a symlink; refusing to follow it") from None
        raise InvalidArgument(f"{where}: exists and is not a directory") from None


def walk_dirs(root: str, parts: list[str], *, create: bool = True, mode: int = 0o755,
              uid: int = -1, gid: int = -1) -> Walk:
    """Open ``root/parts...`` as a directory without following symlinks, creating what is missing.

    ``root`` itself is trusted (the agent made it). On failure every directory created here is
    removed again before the error propagates.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walk = Walk(fd, root)
    try:
        for name in parts:
            where = os.path.join(walk.path, name)
            try:
                nfd = _open_dir(name, walk.fd, where)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(name, mode, dir_fd=walk.fd)
                walk.created.append(where)
                os.chmod(name, mode, dir_fd=walk.fd, follow_symlinks=False)
                if uid >= 0 or gid >= 0:
                    os.chown(name, uid, gid, dir_fd=walk.fd, follow_symlinks=False)
                nfd = _open_dir(name, walk.fd, where)
            os.close(walk.fd)
            walk.fd, walk.path = nfd, where
    except BaseException:
        walk.close()
        remove_dirs(walk.created)
        raise
    return walk


def remove_dirs(created: list[str]) -> None:
    """Remove directories created by a walk, deepest first; ones that are not empty stay."""
    for path in reversed(created):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError:
            break


def ensure_dirs(root: str, path: str, what: str, mode: int = 0o755) -> list[str]:
    """Create ``path`` (lexically under ``root``) safely; returns the directories created."""
    walk = walk_dirs(root, lexical_under(path, root, what), mode=mode)
    walk.close()
    return walk.created


def real_under(path: str, root: str, what: str) -> str:
    """``path`` with symlinks resolved; it must still be under ``root`` (resolved too)."""
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if not real.startswith(real_root.rstrip("/") + "/"):
        raise InvalidArgument(f"{what}: {path!r} resolves to {real!r}, outside {root}/")
    return real
