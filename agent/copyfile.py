"""CopyFile: the host copies files into /run/kata-containers/shared/containers/ in chunks.

A regular file arrives as chunks (``offset``, ``data``) of a ``file_size`` total; the bytes go to a
temporary file beside the target, which is renamed into place when the last byte is written, so a
reader never sees half a file. Parents are created with ``dir_mode``; ``uid``/``gid`` (when not
negative) own the result. ``S_IFDIR`` makes a directory; ``S_IFLNK`` makes a symlink whose target
is ``data`` and must stay inside the shared root. Every path is walked component by component
without following symlinks, and ``..`` is refused, so nothing is written outside the root.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass

from agent.errors import FailedPrecondition, InvalidArgument
from agent.storage import paths

SHARED = "/run/kata-containers/shared/containers"
DEFAULT_DIR_MODE = 0o755
TMP_SUFFIX = ".kata-copy"


@dataclass
class Target:
    parent_fd: int
    name: str
    parts: list[str]  # components below the root, the last one being ``name``
    created: list[str]  # parent directories this request created


def _owner(req) -> tuple[int, int]:
    return (req.uid if req.uid >= 0 else -1), (req.gid if req.gid >= 0 else -1)


def _open_parent(root: str, req) -> Target:
    parts = paths.lexical_under(req.path, SHARED, "path")
    dir_mode = stat.S_IMODE(req.dir_mode) or DEFAULT_DIR_MODE
    uid, gid = _owner(req)
    walk = paths.walk_dirs(root, parts[:-1], mode=dir_mode, uid=uid, gid=gid)
    return Target(walk.fd, parts[-1], parts, walk.created)


def _check_symlink_target(target: str, parts: list[str]) -> None:
    if not target:
        raise InvalidArgument("data: empty symlink target")
    if "\0" in target:
        raise InvalidArgument("data: symlink target contains a NUL byte")
    if target.startswith("/"):
        raise InvalidArgument(f"data: symlink target {target!r} is absolute; it would leave {SHARED}")
    depth = len(parts) - 1
    for comp in target.split("/"):
        if comp == "..":
            depth -= 1
            if depth < 0:
                raise InvalidArgument(f"data: symlink target {target!r} leaves {SHARED}")
        elif comp not in ("", "."):
            depth += 1


def _replace(tmp: str, name: str, parent_fd: int) -> None:
    """Rename ``tmp`` over ``name``; an existing directory there is not replaced."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        os.unlink(tmp, dir_fd=parent_fd)
        raise InvalidArgument(f"path: {name!r} exists and is a directory")
    os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)


def _make_symlink(t: Target, req) -> None:
    link_target = req.data.decode(errors="strict")
    _check_symlink_target(link_target, t.parts)
    tmp = f".{t.name}{TMP_SUFFIX}"
    try:
        os.unlink(tmp, dir_fd=t.parent_fd)
    except FileNotFoundError:
        pass
    os.symlink(link_target, tmp, dir_fd=t.parent_fd)
    uid, gid = _owner(req)
    os.chown(tmp, uid, gid, dir_fd=t.parent_fd, follow_symlinks=False)
    _replace(tmp, t.name, t.parent_fd)


def _make_dir(t: Target, req) -> None:
    mode = stat.S_IMODE(req.file_mode)
    try:
        os.mkdir(t.name, mode, dir_fd=t.parent_fd)
    except FileExistsError:
        st = os.stat(t.name, dir_fd=t.parent_fd, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"path: {t.name!r} exists and is not a directory") from None
    fd = os.open(t.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=t.parent_fd)
    try:
        os.fchmod(fd, mode)
        uid, gid = _owner(req)
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def _write_chunk(t: Target, req) -> None:
    if req.offset < 0 or req.file_size < 0:
        raise InvalidArgument("offset/file_size: must not be negative")
    end = req.offset + len(req.data)
    if end > req.file_size:
        raise InvalidArgument(f"data: chunk ends at {end}, beyond file_size {req.file_size}")
    tmp = f".{t.name}{TMP_SUFFIX}"
    flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    if req.offset == 0:
        flags |= os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(tmp, flags, 0o600, dir_fd=t.parent_fd)
    except FileNotFoundError:
        raise FailedPrecondition(f"offset: {req.offset} continues a copy of {req.path!r} "
                                 "that was never started (offset 0)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidArgument(f"path: temporary file for {req.path!r} is a symlink") from None
        raise
    try:
        _write_open(fd, t, req, end)
    except BaseException:
        os.close(fd)
        _unlink_at(tmp, t.parent_fd)  # the transfer is aborted; nothing half-written stays
        raise
    os.close(fd)
    if end == req.file_size:
        _replace(tmp, t.name, t.parent_fd)


def _unlink_at(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _write_open(fd: int, t: Target, req, end: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"path: temporary file for {req.path!r} is not a regular file")
    if st.st_size != req.offset:
        raise FailedPrecondition(f"offset: {req.offset} but {st.st_size} bytes have arrived so far")
    os.pwrite(fd, req.data, req.offset)
    if end < req.file_size:
        return
    os.fchmod(fd, stat.S_IMODE(req.file_mode) or 0o644)
    uid, gid = _owner(req)
    os.fchown(fd, uid, gid)
    os.fsync(fd)


def copy_file(root: str, req) -> None:
    """Apply one CopyFile request below ``root`` (the agent's shared/containers directory)."""
    kind = stat.S_IFMT(req.file_mode)
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
        raise InvalidArgument(f"file_mode: {oct(kind)} is not a regular file, directory or symlink")
    t = _open_parent(root, req)
    try:
        if kind == stat.S_IFLNK:
            _make_symlink(t, req)
        elif kind == stat.S_IFDIR:
            _make_dir(t, req)
        else:
            _write_chunk(t, req)
    except BaseException:
        os.close(t.parent_fd)
        paths.remove_dirs(t.created)
        raise
    os.close(t.parent_fd)


def shared_root_for(run_dir: str) -> str:
    return posixpath.join(os.path.realpath(run_dir), "kata-containers", "shared", "containers")
