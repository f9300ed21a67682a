"""The thin syscall layer: what ``os`` lacks, through ctypes, and the kernel's own text formats.

Every libc call and kernel constant of the agent lives here; no policy, only calls. Every function
raises ``OSError`` with the errno and the call named, like ``os`` does. Also here: the mount(8)
option words, /proc/self/mountinfo and the kernel command line, each parsed in one place.
Standard library only, and little of it: the spawner imports this module, and whatever it loads
makes each of the spawner's forks dearer (dataclasses, for one, brings inspect: 14 modules and
1.5 MB more in the spawner). Importable in PID-1 set-up (no grpc, no protobuf).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
from collections.abc import Iterable
from typing import NamedTuple

_MACHINE = os.uname().machine  # what platform.machine() says, without importing platform (45 ms in a TCG guest)

_libc = ctypes.CDLL(None, use_errno=True)
# Looked up now, once: the spawner imports this module before it forks, so its children find
# these resolved instead of each paying dlsym and ctypes' set-up for every first call.
for _name in ("mount", "umount2", "setns", "unshare", "sethostname", "prctl", "capset", "syscall"):
    getattr(_libc, _name)

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MS_PROPAGATION = MS_UNBINDABLE | MS_PRIVATE | MS_SLAVE | MS_SHARED

MNT_DETACH = 2

# mount(8)'s option words: word -> (flags it sets, flags it clears). The one table that OCI
# mounts (agent.oci) and storages (agent.storage) share.
MOUNT_FLAGS: dict[str, tuple[int, int]] = {
    "defaults": (0, 0),
    "ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY),
    "nosuid": (MS_NOSUID, 0), "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0), "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0), "exec": (0, MS_NOEXEC),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS),
    "dirsync": (MS_DIRSYNC, 0), "mand": (MS_MANDLOCK, 0), "nomand": (0, MS_MANDLOCK),
    "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME),
    "nodiratime": (MS_NODIRATIME, 0), "diratime": (0, MS_NODIRATIME),
    "relatime": (MS_RELATIME, 0), "norelatime": (0, MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "lazytime": (MS_LAZYTIME, 0), "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "bind": (MS_BIND, 0), "rbind": (MS_BIND | MS_REC, 0),
    "remount": (MS_REMOUNT, 0), "silent": (MS_SILENT, 0),
}
# Propagation words: a mount(2) call of their own, after the mount.
MOUNT_PROPAGATION: dict[str, int] = {
    "private": MS_PRIVATE, "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED, "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | MS_REC,
}


class MountWords(NamedTuple):
    """mount(8) option words sorted out: ``flags`` (propagation aside), the ``propagation``
    words' flags in the order given, and the rest (``data``), for the file system."""

    flags: int = 0
    propagation: tuple[int, ...] = ()
    data: tuple[str, ...] = ()


def parse_mount_options(options: Iterable[str]) -> MountWords:
    """Sort ``["ro", "nodev,size=10m", "rslave"]`` by MOUNT_FLAGS and MOUNT_PROPAGATION; words
    may hold comma lists, as mount(8) takes them. A later word wins over an earlier one."""
    flags, propagation, data = 0, [], []
    for option in options:
        for word in option.split(","):
            if word in MOUNT_FLAGS:
                on, off = MOUNT_FLAGS[word]
                flags = (flags | on) & ~off
            elif word in MOUNT_PROPAGATION:
                propagation.append(MOUNT_PROPAGATION[word])
            elif word:
                data.append(word)
    return MountWords(flags, tuple(propagation), tuple(data))

# clone(2) namespace flags
CLONE_NEWTIME = 0x80
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
_SYS_RT_SIGACTION = {"x86_64": 13, "aarch64": 134, "ppc64le": 173, "s390x": 174, "riscv64": 134}


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           f"mount {source or 'none'} on {target} (type {fstype or 'none'})")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    nr = _SYS_PIVOT_ROOT[_MACHINE]
    _check(_libc.syscall(ctypes.c_long(nr), _b(new_root), _b(put_old)), "pivot_root")


def signal_default(sig: int) -> None:
    """rt_sigaction(sig, SIG_DFL) by the raw system call: glibc's sigaction refuses its own
    internal signals (32 and 33), which its posix_spawn leaves ignored in the new program."""
    act = ctypes.create_string_buffer(32)  # handler SIG_DFL (0), no flags, empty mask
    _check(_libc.syscall(ctypes.c_long(_SYS_RT_SIGACTION[_MACHINE]), ctypes.c_long(sig),
                         act, None, ctypes.c_size_t(8)), f"rt_sigaction {sig}")


def setns(fd: int, nstype: int = 0) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                              ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)), f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (64-bit masks)."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = (effective >> shift) & 0xFFFFFFFF
        data[i].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[i].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


@functools.cache
def cap_last_cap() -> int:
    """The highest capability the kernel knows (read once: the spawner reads it before it forks)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


# clone3(2): fork straight into a cgroup v2 directory (no migration, so no RCU grace period), or
# as a sibling (CLONE_PARENT) in new namespaces.
SYS_CLONE3 = 435  # the same number on every architecture (new syscalls share one table)
CLONE_PARENT = 0x00008000
CLONE_INTO_CGROUP = 0x200000000
_pylibc = ctypes.PyDLL(None, use_errno=True)  # keeps the GIL across the call: the child holds it too


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


def fork_into_cgroup(cgroup_fd: int) -> int:
    """fork(), the child starting in the cgroup v2 directory ``cgroup_fd``: 0 in the child.

    Raises OSError (ENOSYS before Linux 5.7) so that callers can fall back to fork + migration.
    """
    return clone3(CLONE_INTO_CGROUP, cgroup_fd)


def clone3(flags: int, cgroup_fd: int = 0) -> int:
    """fork() by clone3(2) with ``flags``: 0 in the child. Its exit signal is SIGCHLD, or with
    CLONE_PARENT the caller's own (the kernel refuses any other then).

    Only for single-threaded processes whose child execs or ends with ``os._exit``: no at-fork
    handlers run. OSError when the kernel refuses the flags (ENOSYS before Linux 5.3).
    """
    import signal

    exit_signal = 0 if flags & CLONE_PARENT else signal.SIGCHLD
    args = _CloneArgs(flags=flags, exit_signal=exit_signal, cgroup=cgroup_fd)
    return _check(_pylibc.syscall(ctypes.c_long(SYS_CLONE3), ctypes.byref(args),
                                  ctypes.c_size_t(ctypes.sizeof(args))), "clone3")


# mount_setattr(2), Linux 5.12: change the flags of a whole mount tree in one call.
SYS_MOUNT_SETATTR = 442  # the same number on every architecture
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MOUNT_ATTR__ATIME, MOUNT_ATTR_RELATIME, MOUNT_ATTR_NOATIME, MOUNT_ATTR_STRICTATIME = 0x70, 0x0, 0x10, 0x20
MOUNT_ATTR_NODIRATIME = 0x80


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, attr_set: int, attr_clr: int, recursive: bool = True) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(_libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), -100, _b(path),
                         ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), "mount_setattr")


# The mount API (Linux 5.2), the same numbers on every architecture: a file system mounted
# detached, by one process, and attached elsewhere by another (move_mount).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = FSMOUNT_CLOEXEC = 0x1
FSCONFIG_CMD_CREATE = 6
MOVE_MOUNT_F_EMPTY_PATH = 0x4


def fsmount_new(fstype: str, attr_flags: int = 0) -> int:
    """A new, detached mount of ``fstype`` (no options): an O_CLOEXEC fd for move_mount."""
    fs = _check(_libc.syscall(ctypes.c_long(SYS_FSOPEN), _b(fstype), ctypes.c_uint(FSOPEN_CLOEXEC)), "fsopen")
    try:
        _check(_libc.syscall(ctypes.c_long(SYS_FSCONFIG), fs, ctypes.c_uint(FSCONFIG_CMD_CREATE), None, None, 0),
               "fsconfig")
        return _check(_libc.syscall(ctypes.c_long(SYS_FSMOUNT), fs, ctypes.c_uint(FSMOUNT_CLOEXEC),
                                    ctypes.c_uint(attr_flags)), "fsmount")
    finally:
        os.close(fs)


def move_mount_fd(fd: int, target: str) -> None:
    """Attach the detached mount ``fd`` at ``target``."""
    _check(_libc.syscall(ctypes.c_long(SYS_MOVE_MOUNT), fd, b"", -100, _b(target),
                         ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)), "move_mount")


# --- swap, modules, power ---------------------------------------------------------------------

RB_AUTOBOOT = 0x01234567
RB_POWER_OFF = 0x4321FEDC
_SYS_FINIT_MODULE = {"x86_64": 313, "aarch64": 273, "ppc64le": 353, "s390x": 344, "riscv64": 273}


def swapon(path: str, flags: int = 0) -> None:
    _check(_libc.swapon(_b(path), flags), f"swapon {path}")


def finit_module(fd: int, params: str = "", flags: int = 0) -> None:
    nr = _SYS_FINIT_MODULE.get(_MACHINE)
    if nr is None:
        raise OSError(errno.ENOSYS, f"finit_module: no system call number for {_MACHINE}")
    _check(_libc.syscall(ctypes.c_long(nr), fd, params.encode(), flags), "finit_module")


def reboot(cmd: int) -> None:
    """reboot(2): RB_POWER_OFF or RB_AUTOBOOT (only PID 1's business)."""
    _check(_libc.reboot(ctypes.c_int(cmd)), "reboot")


# --- /dev/random ioctls (linux/random.h): _IOW('R', 0x03, int[2]) and _IO('R', 0x07) ----------

RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


# --- inotify(7) -------------------------------------------------------------------------------

IN_MODIFY = 0x2
IN_IGNORED = 0x8000


def inotify_init1(flags: int) -> int:
    return _check(_libc.inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(fd, _b(path), ctypes.c_uint32(mask)),
                  f"inotify_add_watch {path}")


def inotify_rm_watch(fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(fd, wd), "inotify_rm_watch")


# --- bpf(2) -----------------------------------------------------------------------------------

BPF_PROG_LOAD, BPF_PROG_ATTACH, BPF_PROG_DETACH = 5, 8, 9
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}


def bpf(cmd: int, attr: ctypes.Array) -> int:
    """bpf(2) with ``attr`` (a buffer laid out as union bpf_attr); the call's result."""
    nr = _SYS_BPF.get(_MACHINE)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf: no system call number for {_MACHINE}")
    return _check(_libc.syscall(ctypes.c_long(nr), cmd, ctypes.byref(attr),
                                ctypes.c_uint(ctypes.sizeof(attr))), f"bpf({cmd})")


# --- /proc/self/mountinfo ---------------------------------------------------------------------


class MountEntry(NamedTuple):
    """One line of mountinfo (proc(5)), its paths unescaped."""

    mount_id: int
    parent_id: int
    root: str  # the mount's root within its file system
    mount_point: str
    options: str  # per-mount options (``rw,nosuid,relatime``)
    fstype: str
    source: str
    super_options: str  # the superblock's options


_OCTAL = re.compile(rb"\\([0-3][0-7][0-7])")


def _unescape(field: str) -> str:
    """The kernel writes space, tab, newline and backslash as a backslash and three octal digits,
    and every other byte as it is: turn the escapes back into bytes, then decode the whole as
    UTF-8 (bytes that are not UTF-8 kept as ``os`` keeps them). ``/mnt/é\\040x`` is ``/mnt/é x``."""
    raw = field.encode("utf-8", "surrogateescape")
    return _OCTAL.sub(lambda m: bytes([int(m[1], 8)]), raw).decode("utf-8", "surrogateescape")


def parse_mountinfo(text: bytes | str) -> list[MountEntry]:
    """The entries of mountinfo ``text``, in its order (a later mount hides an earlier one at the
    same point); malformed lines are skipped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    out = []
    for line in text.split("\n"):  # only "\n" and " " separate: a path may hold "\r" or "\f"
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(" "), right.split(" ")
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        if "\\" in line:
            fields, tail = [_unescape(f) for f in fields], [_unescape(f) for f in tail]
        out.append(MountEntry(int(fields[0]), int(fields[1]), fields[3], fields[4], fields[5],
                              tail[0], tail[1], tail[2] if len(tail) > 2 else ""))
    return out


def mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def mounts_under(prefix: str | os.PathLike, path: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``prefix`` (whole components), deepest (latest) first."""
    prefix = os.fspath(prefix).rstrip("/")
    found = [m.mount_point for m in mountinfo(path)
             if m.mount_point == prefix or m.mount_point.startswith(prefix + "/")]
    return list(reversed(found))


# --- the kernel command line ------------------------------------------------------------------

_BLANK = " \t\n\v\f\r"


def parse_cmdline(text: str) -> dict[str, str]:
    """Split a kernel command line as the kernel's ``next_arg`` does: ``key=value`` -> {key: value},
    a bare ``key`` -> {key: ""}, a later key wins, ``--`` ends the kernel's part.

    Double quotes group blanks: ``key="a b"`` and ``"key=a b"`` both give ``a b`` (the quotes
    around the value or the whole word go); a quote inside a value stays, as the kernel keeps it.
    """
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _BLANK:
            i += 1
        if i >= n:
            return out
        quoted = text[i] == '"'
        start = i = i + quoted
        in_quote, equals = quoted, -1
        while i < n and (in_quote or text[i] not in _BLANK):
            if equals < 0 and text[i] == "=" and i > start:
                equals = i
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        end = i
        value_quoted = equals >= 0 and text[equals + 1:equals + 2] == '"'
        if (quoted or value_quoted) and end > start and text[end - 1] == '"':
            end -= 1
        if equals < 0:
            if text[start:end] == "--":
                return out
            out[text[start:end]] = ""
        else:
            value_start = equals + 1 + value_quoted
            out[text[start:equals]] = text[value_start:max(end, value_start)]
        i += 1


def read_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    """parse_cmdline of ``path``; {} when it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return parse_cmdline(f.read())
    except OSError:
        return {}
