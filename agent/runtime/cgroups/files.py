"""Reading and writing cgroup files: one write(2) a value, as the kernel expects."""

from __future__ import annotations

import errno
import os

U64_MAX = 2**64 - 1


def write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class Writer:
    """Writes for a sequence of values that keeps the last file open: a run of writes to one file
    (v1 device rules take one rule per write(2)) then costs one system call per value."""

    def __init__(self) -> None:
        self.path, self.fd = "", -1

    def open(self, path: str) -> bool:
        """Make ``path`` the open file; False when it does not exist."""
        if path != self.path:
            self.close()
            try:
                self.fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            self.path = path
        return True

    def write(self, path: str, value: str) -> None:
        if not self.open(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        os.write(self.fd, value.encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.path, self.fd = "", -1


def read(path: str) -> str:
    # os-level calls: open() would add fstat, ioctl and lseek calls on every cgroup file
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def read_opt(path: str) -> str | None:
    try:
        return read(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def to_int(text: str) -> int:
    """A cgroup number; "max" is U64_MAX."""
    text = text.strip()
    return U64_MAX if text == "max" else int(text)


def read_int(path: str, default: int = 0) -> int:
    text = read_opt(path)
    if text is None or not text.strip():
        return default
    try:
        return to_int(text.split()[0])
    except ValueError:
        return default


def parse_kv(text: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, memory.events) -> dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = to_int(parts[1])
            except ValueError:
                continue
    return out


def read_kv(path: str) -> dict[str, int]:
    text = read_opt(path)
    return parse_kv(text) if text else {}
