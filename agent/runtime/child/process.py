"""What a container's process does last, in the init or an exec'd child: stdio, oom score,
rlimits, user and groups (from the container's /etc), capabilities, no_new_privs, seccomp, and
exec. The init first reports protocol.Ready and waits for protocol.Start."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import socket
import stat
import termios
from collections.abc import Callable
from typing import Any, NoReturn

from agent import linux
from agent.runtime import protocol, seccomp
from agent.runtime.child.common import SetupError, fail, step
from agent.runtime.protocol import Ready, Start

def setup_stdio(stdio: list[int], terminal: bool, sync: socket.socket, keep: tuple[int, ...] = ()) -> None:
    if os.getsid(0) != os.getpid():  # a zygote that became the init made its session ahead
        os.setsid()
    if terminal:
        step("set the controlling terminal", fcntl.ioctl, stdio[0], termios.TIOCSCTTY, 0)
    for target, fd in enumerate(stdio):
        if fd != target:
            os.dup2(fd, target)
    start = 3
    for fd in sorted({sync.fileno(), *keep} - {-1}):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 16)


def exec_process(proc: dict[str, Any], sync: socket.socket, stdio: list[int] | None, wait_start: bool,
                 reported: int = -1, seccomp_cfg: dict[str, Any] | None = None) -> NoReturn:
    if stdio is not None:
        setup_stdio(stdio, proc["terminal"], sync)
    if proc["oom_score_adj"] is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            step("oom_score_adj", f.write, str(proc["oom_score_adj"]))
    for res, soft, hard in proc["rlimits"]:
        step(f"setrlimit {res}", resource.setrlimit, res, (soft, hard))
    user = resolve_user(proc)
    env = _environment(proc["env"], user.home)
    nnp = proc["no_new_privileges"]
    filt = _step_seccomp(seccomp.build, seccomp_cfg) if seccomp_cfg else None
    if filt is not None and not nnp:
        _step_seccomp(seccomp.load, filt)  # needs CAP_SYS_ADMIN: before the capabilities go
    _become(user, proc)
    try:
        os.chdir(proc["cwd"])
    except OSError as exc:
        raise SetupError(f"chdir {proc['cwd']}: {exc.strerror}") from None
    os.umask(proc["umask"])
    if nnp:
        step("no_new_privs", linux.prctl, linux.PR_SET_NO_NEW_PRIVS, 1)
    path = _look_path(proc["args"][0], env)  # as runc: a missing program fails the create
    if reported >= 0:
        _wait_eof(reported)  # the pid message goes first
    if wait_start:
        protocol.send(sync, Ready())
        if not isinstance(protocol.receive(sync), Start):
            os._exit(1)  # the agent gave up on this container
    _reset_signals()
    if filt is not None and nnp:
        try:
            seccomp.load(filt)  # as late as possible: the filter sees only exec from here
        except seccomp.SeccompError as exc:
            fail(sync, str(exc))
    try:
        os.execve(path, proc["args"], env)
    except OSError as exc:
        fail(sync, f"exec {proc['args'][0]}: {exc.strerror}", 127)


def _wait_eof(fd: int) -> None:
    while os.read(fd, 1):
        pass
    os.close(fd)


def _look_path(name: str, env: dict[str, str]) -> str:
    """The program execve will run: ``name`` if it has a slash, else the first hit in PATH."""
    candidates = [name] if "/" in name else [
        os.path.join(d or ".", name) for d in env.get("PATH", os.defpath).split(os.pathsep)]
    denied = False
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return path
        denied = True
    reason = "permission denied" if denied else "no such file or directory"
    where = "" if "/" in name else " in $PATH"
    raise SetupError(f"exec {name}: {reason}{where}")


def _step_seccomp(fn: Callable[..., Any], arg: Any) -> Any:
    try:
        return fn(arg)
    except seccomp.SeccompError as exc:
        raise SetupError(str(exc)) from None


# The signals the spawner left ignored, as ``learn`` found them; None: not looked up yet.
_ignored: list[int] | None = None


def learn() -> None:
    """Find the ignored signals (and the last capability) ahead, once in the spawner before it
    forks (about 0.3 ms of each fresh fork's time otherwise): its children inherit its
    dispositions, and nothing in them changes one before ``_reset_signals``."""
    global _ignored
    _ignored = _ignored_signals()
    linux.cap_last_cap()  # cached


def _ignored_signals() -> list[int]:
    out = []
    for sig in signal.valid_signals():
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                out.append(sig)
        except (OSError, ValueError):
            pass
    return out


def _reset_signals() -> None:
    """Un-ignore signals (exec resets caught ones itself) and unblock all.

    glibc keeps its internal signals (32 up to SIGRTMIN) out of valid_signals() and out of
    sigaction(); its posix_spawn, which started the spawner, leaves them ignored. Those go
    through the raw system call.
    """
    for sig in _ignored if _ignored is not None else _ignored_signals():
        signal.signal(sig, signal.SIG_DFL)
    for sig in range(32, signal.SIGRTMIN):
        linux.signal_default(sig)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _environment(env_list: list[str], home: str) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in env_list)
    env.setdefault("HOME", home)
    return env


class User:
    def __init__(self, uid: int, gid: int, groups: list[int], home: str) -> None:
        self.uid, self.gid, self.groups, self.home = uid, gid, groups, home


def _read_db(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def resolve_user(proc: dict[str, Any], etc: str = "/etc") -> User:
    """uid, gid, groups and HOME of the process, from the container's /etc/passwd and /etc/group."""
    passwd = [p for p in _read_db(f"{etc}/passwd") if len(p) >= 7]
    groups = [g for g in _read_db(f"{etc}/group") if len(g) >= 4]
    uid, gid, extra = proc["uid"], proc["gid"], list(proc["additional_gids"])
    name = None
    if proc["user"]:
        user_part, _, group_part = proc["user"].partition(":")
        entry = _lookup(passwd, user_part, 2)
        if entry is None and not user_part.isdigit():
            raise SetupError(f"user {user_part!r}: not found in /etc/passwd")
        uid = int(entry[2]) if entry else int(user_part)
        gid = int(entry[3]) if entry else 0
        if entry:
            name = entry[0]
        if group_part:
            g = _lookup(groups, group_part, 2)
            if g is None and not group_part.isdigit():
                raise SetupError(f"group {group_part!r}: not found in /etc/group")
            gid = int(g[2]) if g else int(group_part)
        elif name:
            extra += [int(g[2]) for g in groups if name in g[3].split(",")]
    home = next((p[5] for p in passwd if p[2] == str(uid)), "/")
    return User(uid, gid, extra, home)


def _lookup(db: list[list[str]], key: str, id_field: int) -> list[str] | None:
    for entry in db:
        if entry[0] == key or (key.isdigit() and entry[id_field] == key):
            return entry
    return None


def _own_stdio(uid: int) -> None:
    """runc's fixStdioPermissions: stdio belongs to the user the process becomes, so that it can
    reopen it (/dev/stdout); /dev/null is left alone, and so is a file whose owner this user
    namespace does not map (EPERM)."""
    for fd in (0, 1, 2):
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if st.st_uid == uid or (stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL):
            continue
        try:
            os.fchown(fd, uid, -1)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EROFS):
                raise SetupError(f"chown stdio {fd}: {exc.strerror}") from None


_DEV_NULL = os.makedev(1, 3)


def _become(user: User, proc: dict[str, Any]) -> None:
    _own_stdio(user.uid)
    caps = proc["caps"] if proc["caps_given"] else None
    if caps is not None:
        for cap in range(linux.cap_last_cap() + 1):
            if not caps["bounding"] >> cap & 1:
                step("drop bounding capability", linux.prctl, linux.PR_CAPBSET_DROP, cap)
        linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    step("setgroups", os.setgroups, user.groups)
    step("setgid", os.setgid, user.gid)
    step("setuid", os.setuid, user.uid)
    if caps is None:
        return
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    step("capset", linux.capset, caps["effective"], caps["permitted"], caps["inheritable"])
    for cap in range(64):
        if caps["ambient"] >> cap & 1:
            try:  # as runc: a cap not in the inheritable set cannot be ambient; warn-free skip
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, cap)
            except OSError:
                pass
