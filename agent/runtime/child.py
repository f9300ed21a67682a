"""Code that runs in the spawner's forked children: container init, exec'd processes, tasks.

Imports only the standard library and agent.linux (the spawner is forked before grpc exists).
Every child talks to the agent on its own ``sync`` socket (SOCK_SEQPACKET, JSON messages):

* the intermediate child sends ``{"pid": N}`` (the grandchild's pid) and exits, so the
  grandchild is re-parented to the agent (a child subreaper, or PID 1) and reaped there;
* a container init sends ``{"ready": true}`` or ``{"error": "..."}``, then blocks until the agent
  writes the start byte, then execs; the sync fd is close-on-exec, so the agent reads EOF when
  exec succeeded and ``{"error": ...}`` when it failed;
* an exec'd process does the same without waiting for a start byte.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import resource
import signal
import socket
import stat
import struct
import termios
from collections.abc import Callable
from typing import Any, NoReturn

from agent import linux
from agent.runtime import seccomp
from agent.runtime.paths import mkdir_all, secure_join

DEFAULT_DEVICES = [("/dev/null", 1, 3), ("/dev/zero", 1, 5), ("/dev/full", 1, 7),
                   ("/dev/random", 1, 8), ("/dev/urandom", 1, 9), ("/dev/tty", 5, 0)]
DEV_LINKS = [("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
             ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"),
             ("pts/ptmx", "/dev/ptmx")]
NS_ORDER = [("user", linux.CLONE_NEWUSER), ("cgroup", linux.CLONE_NEWCGROUP), ("ipc", linux.CLONE_NEWIPC),
            ("uts", linux.CLONE_NEWUTS), ("net", linux.CLONE_NEWNET), ("pid", linux.CLONE_NEWPID),
            ("mnt", linux.CLONE_NEWNS)]
# statvfs flags -> mount flags, kept when a mount is remounted read-only.
_KEEP_FLAGS = [(os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV), (os.ST_NOEXEC, linux.MS_NOEXEC),
               (os.ST_NOATIME, linux.MS_NOATIME), (os.ST_NODIRATIME, linux.MS_NODIRATIME),
               (os.ST_RELATIME, linux.MS_RELATIME)]


class SetupError(Exception):
    """A step of the container set-up failed; the message says which."""


def send(sync: socket.socket, msg: dict[str, Any]) -> None:
    try:
        sync.send(json.dumps(msg).encode())
    except OSError:
        pass


def fail(sync: socket.socket, message: str, code: int = 1) -> NoReturn:
    send(sync, {"error": message})
    os._exit(code)


def _step(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError as exc:
        raise SetupError(f"{what}: {exc.strerror or exc}") from None


# --- entry points (called in the spawner's forked child) ----------------------------------------

def spawn_container(cfg: dict[str, Any], sync: socket.socket, stdio: list[int],
                    cgroup: dict[str, Any] | None) -> NoReturn:
    """The intermediate child of a CreateContainer: join, unshare, fork the init, report its pid.

    The init starts in its cgroup without a migration by the agent (see ``_fork_into``), so
    no RCU grace period is paid: a v1 ``cgroup.procs`` write costs ~14 ms here.
    """
    try:
        _join_paths(cfg["namespaces"])
        _step("unshare", linux.unshare, _unshare_flags(cfg))
        if cgroup is None:  # the agent creates the cgroup meanwhile, and sends it next
            cgroup = _receive_cgroup(sync)
        # Opened before the fork: the init's pivot_root changes this process's root too.
        target = _open_cgroup(cgroup)
        reported_r, reported_w = os.pipe()  # EOF: the agent has the init's pid
        pid = _fork_into(target)
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))
    if pid == 0:
        try:
            _enter_cgroup(target)
        except SetupError as exc:
            fail(sync, str(exc))
        os.close(reported_w)
        _container_init(cfg, sync, stdio, reported_r, lambda: None)
    send(sync, {"pid": pid})
    os.close(reported_w)
    os._exit(0)


def init_container(cfg: dict[str, Any], sync: socket.socket, stdio: list[int],
                   cgroup: dict[str, Any] | None, premade: dict[int, int] | None = None) -> NoReturn:
    """A CreateContainer taken by a zygote born as PID 1 of a new PID namespace and as the
    agent's child (agent.runtime.spawner): it becomes the container's init itself. No fork while
    the client waits, and none of the intermediate's copy-on-write faults. It joins its cgroup
    in the course of the rootfs set-up (see ``_container_init``), while the agent makes it.

    ``premade``: the namespaces the zygote made while it waited (``premake_namespaces``).
    It moves itself into the cgroup (see ``_enter_cgroup``); the agent sends a container with a
    v2 cgroup this way only where cgroup2 favors dynamic changes (Runtime._init_is_zygote).
    """
    try:
        send(sync, {"pid": int(os.readlink("/proc/self"))})  # /proc is still the agent's
        _join_paths(cfg["namespaces"])
        flags = _settle_premade(cfg, premade or {})
        _step("unshare", linux.unshare, flags & ~linux.CLONE_NEWPID)
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))

    def join_cgroup() -> None:  # the agent makes the cgroup while the rootfs is set up
        _enter_cgroup(_open_cgroup(cgroup if cgroup is not None else _receive_cgroup(sync)))

    _container_init(cfg, sync, stdio, -1, join_cgroup)


# Made by a PID 1 zygote while it waits for a request. A network namespace takes about 0.5 ms
# to create here, and a fresh one holds only a loopback device that is down: one made early is
# as new as one made on request. Not so a mount namespace (a copy of the mount table of its
# time, without the rootfs mounted since) or a UTS one (a copy of the hostname).
PREMADE = (("net", linux.CLONE_NEWNET),)


def premake_namespaces() -> dict[int, int]:
    """Enter new PREMADE namespaces; returns {flag: fd of the namespace left}, for a container
    that shares it. What cannot be made here is left to the request."""
    left = {}
    for name, flag in PREMADE:
        try:
            fd = os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            linux.unshare(flag)
        except OSError:
            os.close(fd)
            continue
        left[flag] = fd
    return left


def _settle_premade(cfg: dict[str, Any], premade: dict[int, int]) -> int:
    """Use or leave the premade namespaces (after ``_join_paths``); the flags still to unshare.

    A namespace the spec asks new is the premade one; one given by path was joined already; one
    not listed is shared with the agent, so the zygote goes back to the namespace it left.
    """
    flags = _unshare_flags(cfg)
    listed = {flag for flag, _ in cfg["namespaces"]}
    for flag, left in premade.items():
        try:
            if flag not in listed:
                _step("setns back to the agent's namespace", linux.setns, left, flag)
        finally:
            os.close(left)
        flags &= ~flag
    return flags


def _unshare_flags(cfg: dict[str, Any]) -> int:
    """The namespaces to create (the cgroup one is made by the init, once in its cgroup)."""
    flags = 0
    for flag, path in cfg["namespaces"]:
        if not path and flag != linux.CLONE_NEWCGROUP:
            flags |= flag
    return flags


def _receive_cgroup(sync: socket.socket) -> dict[str, Any]:
    """The cgroup the agent made meanwhile; EOF means it gave up (its undo removed what it made)."""
    msg = sync.recv(1 << 16)
    if not msg:
        os._exit(0)
    return json.loads(msg)["cgroup"]


def spawn_exec(req: dict[str, Any], sync: socket.socket, stdio: list[int], cgroup: dict[str, Any]) -> NoReturn:
    """The intermediate child of an ExecProcess: join the init's namespaces, cgroup and root."""
    init = req["init_pid"]
    try:
        root = _step("open the container's root", os.open, f"/proc/{init}/root", os.O_DIRECTORY | os.O_RDONLY)
        ns_fds = _open_namespaces(init)
        target = _open_cgroup(cgroup)
        for name, fd, flag in ns_fds:
            _step(f"setns {name}", linux.setns, fd, flag)
        pid = _fork_into(target)
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))
    if pid == 0:
        try:
            _enter_cgroup(target)
            _step("enter the container's root", os.fchdir, root)
            _step("chroot", os.chroot, ".")
            os.close(root)
            _exec_process(req["process"], sync, stdio, wait_start=False, seccomp_cfg=req.get("seccomp"))
        except (OSError, SetupError) as exc:
            fail(sync, str(exc))
    send(sync, {"pid": pid})
    os._exit(0)


def spawn_task(fn: Callable[..., Any], args: dict[str, Any], sync: socket.socket, fds: list[int]) -> NoReturn:
    """The intermediate child of a generic task: fork the worker and exit. The worker reports
    its own pid before anything else, so the caller reads the pid first whichever process the
    scheduler runs first (the intermediate reporting it raced the worker's reply)."""
    if os.fork() == 0:
        code = 0
        try:
            send(sync, {"pid": os.getpid()})  # the spawner's PID namespace: the agent's
            fn(args, fds, lambda msg: send(sync, msg))
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            send(sync, {"error": f"{type(exc).__name__}: {exc}"})
            code = 1
        os._exit(code)
    os._exit(0)


# --- namespaces and cgroups ---------------------------------------------------------------------

def _join_paths(namespaces: list[list[Any]]) -> None:
    for flag, path in namespaces:
        if path:
            fd = _step(f"open namespace {path}", os.open, path, os.O_RDONLY)
            _step(f"setns {path}", linux.setns, fd, flag)
            os.close(fd)


class _CgroupTarget:
    """Open fds of a container's cgroup: the v2 directory (or -1) and the v1 ``tasks`` files."""

    def __init__(self, v2_dir: int, v2_procs: str, v1_tasks: list[tuple[str, int]]) -> None:
        self.v2_dir, self.v2_procs, self.v1_tasks = v2_dir, v2_procs, v1_tasks
        self.forked_into_v2 = False


def _open_cgroup(cgroup: dict[str, Any] | None) -> _CgroupTarget:
    cgroup = cgroup or {}
    v2 = cgroup.get("v2") or ""
    v2_dir = _step(f"join cgroup {v2}", os.open, v2, os.O_RDONLY | os.O_DIRECTORY) if v2 else -1
    tasks = [(d, _step(f"join cgroup {d}", os.open, os.path.join(d, "tasks"), os.O_WRONLY))
             for d in cgroup.get("v1", [])]
    return _CgroupTarget(v2_dir, os.path.join(v2, "cgroup.procs") if v2 else "", tasks)


def _fork_into(target: _CgroupTarget) -> int:
    """Fork; on cgroup v2 the child is born in its cgroup (clone3 CLONE_INTO_CGROUP)."""
    if target.v2_dir >= 0:
        try:
            pid = linux.fork_into_cgroup(target.v2_dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.E2BIG, errno.EINVAL):
                raise SetupError(f"clone3 into {target.v2_procs}: {exc.strerror}") from None
        else:
            target.forked_into_v2 = True
            return pid
    return os.fork()


def _enter_cgroup(target: _CgroupTarget) -> None:
    """In the (single-threaded) child: join the v1 hierarchies, and v2 if clone3 could not.

    A task that moves itself by writing "0" to a v1 ``tasks`` file migrates one thread and
    skips the global threadgroup lock, whose write side waits for an RCU grace period.
    """
    for d, fd in target.v1_tasks:
        _step(f"join cgroup {d}", os.write, fd, b"0")
        os.close(fd)
    if target.v2_dir >= 0:
        if not target.forked_into_v2:
            with open(target.v2_procs, "w") as f:
                _step(f"join cgroup {target.v2_procs}", f.write, "0")
        os.close(target.v2_dir)


def _open_namespaces(pid: int) -> list[tuple[str, int, int]]:
    """Fds of the namespaces of ``pid`` that differ from ours, in joining order."""
    out = []
    for name, flag in NS_ORDER:
        theirs = f"/proc/{pid}/ns/{name}"
        try:
            if os.stat(theirs).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
                continue
        except FileNotFoundError:
            continue
        out.append((name, _step(f"open {theirs}", os.open, theirs, os.O_RDONLY), flag))
    return out


# --- the container init -------------------------------------------------------------------------

def _container_init(cfg: dict[str, Any], sync: socket.socket, stdio: list[int], reported: int,
                    join_cgroup: Callable[[], None]) -> NoReturn:
    """Set up the container and wait for the start; ``join_cgroup`` moves this process into the
    container's cgroup if it is not there yet.

    The cgroup is joined (and the cgroup namespace made) as late as the set-up allows: before
    the first cgroup mount or device node, both of which depend on it, and before pivot_root at
    the latest. Mounts before that point are made while the agent still makes the cgroup.
    """
    joined = False

    def join() -> None:
        nonlocal joined
        if not joined:
            joined = True
            join_cgroup()
            if _new_ns(cfg, linux.CLONE_NEWCGROUP):
                _step("unshare cgroup", linux.unshare, linux.CLONE_NEWCGROUP)

    try:
        os.umask(0)
        proc = cfg["process"]
        _setup_stdio(stdio, proc["terminal"], sync, keep=reported)
        _prepare_rootfs(cfg, proc["terminal"], join)
        join()
        _pivot(cfg["rootfs"])
        _finish_rootfs(cfg)
        if cfg["hostname"] and _new_ns(cfg, linux.CLONE_NEWUTS):
            _step("sethostname", linux.sethostname, cfg["hostname"])
        _exec_process(proc, sync, stdio=None, wait_start=True, reported=reported, seccomp_cfg=cfg.get("seccomp"))
    except (OSError, SetupError) as exc:
        fail(sync, str(exc))


def _wait_eof(fd: int) -> None:
    while os.read(fd, 1):
        pass
    os.close(fd)


def _new_ns(cfg: dict[str, Any], flag: int) -> bool:
    return any(f == flag and not p for f, p in cfg["namespaces"])


def _setup_stdio(stdio: list[int], terminal: bool, sync: socket.socket, keep: int = -1) -> None:
    os.setsid()
    if terminal:
        _step("set the controlling terminal", fcntl.ioctl, stdio[0], termios.TIOCSCTTY, 0)
    for target, fd in enumerate(stdio):
        if fd != target:
            os.dup2(fd, target)
    start = 3
    for fd in sorted({sync.fileno(), keep} - {-1}):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 16)


def _prepare_rootfs(cfg: dict[str, Any], terminal: bool, join: Callable[[], None]) -> None:
    rootfs = cfg["rootfs"]
    _step("set the root propagation", linux.mount, None, "/", None, cfg["root_propagation"])
    _step(f"bind {rootfs}", linux.mount, rootfs, rootfs, None, linux.MS_BIND | linux.MS_REC)
    new_cgroupns = _new_ns(cfg, linux.CLONE_NEWCGROUP)
    fresh_dev = None  # the tmpfs this init mounted at /dev, if nothing covers it since
    for m in cfg["mounts"]:
        if m["type"] == "cgroup":
            join()
        dest = _mount(rootfs, m, new_cgroupns)
        at = os.path.normpath(m["destination"])
        if at in ("/dev", "/"):  # a later mount there covers the tmpfs
            fresh_dev = dest if at == "/dev" and m["type"] == "tmpfs" else None
    join()  # the devices cgroup (v1) decides which nodes may be made
    if cfg["default_devices"]:
        dev = fresh_dev or _step("mkdir /dev", mkdir_all, rootfs, "/dev")
        _default_devices(dev, fresh=fresh_dev is not None)
    for dev in cfg["devices"]:
        _make_device(rootfs, dev)
    if terminal:
        _bind_console(rootfs)


def _mount(rootfs: str, m: dict[str, Any], fresh: bool = False) -> str | None:
    """Mount ``m`` in the rootfs; returns where (None for a cgroup mount)."""
    where = f"mount {m['destination']}"
    if m["type"] == "cgroup":
        return _mount_cgroup(rootfs, m, fresh)
    flags = m["flags"]
    if flags & linux.MS_BIND:
        dest = _bind_target(rootfs, m)
        _step(where, linux.mount, m["source"], dest, None, flags & (linux.MS_BIND | linux.MS_REC))
        if flags & ~(linux.MS_BIND | linux.MS_REC):
            _step(where, linux.mount, None, dest, None, flags | linux.MS_REMOUNT)
    else:
        dest = _step(where, mkdir_all, rootfs, m["destination"])
        _step(where, linux.mount, m["source"], dest, m["type"], flags, m["data"] or None)
    for p in m["propagation"]:
        _step(where, linux.mount, None, dest, None, p)
    return dest


def _bind_target(rootfs: str, m: dict[str, Any]) -> str:
    dest = secure_join(rootfs, m["destination"])
    src_is_dir = _step(f"mount {m['destination']}: source {m['source']}", os.stat, m["source"]).st_mode
    if stat.S_ISDIR(src_is_dir):
        _step(f"mount {m['destination']}", os.makedirs, dest, 0o755, True)
    elif not os.path.lexists(dest):
        _step(f"mount {m['destination']}", os.makedirs, os.path.dirname(dest), 0o755, True)
        os.close(_step(f"mount {m['destination']}", os.open, dest, os.O_CREAT | os.O_WRONLY, 0o644))
    return dest


def _own_cgroups() -> dict[str, str]:
    """controllers (as in /proc/self/cgroup, "" for cgroup2) -> this process's cgroup path."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[controllers] = path
    return out


def _cgroup_mounts() -> list[tuple[str, str, str, str]]:
    """(mount point, fs type, mount root, super options) of the cgroup mounts under /sys/fs/cgroup.

    One per mount point: the last one mounted there, which hides those below it.
    """
    out: dict[str, tuple[str, str, str, str]] = {}
    for m in linux.mountinfo():
        if m.fstype in ("cgroup", "cgroup2") and m.mount_point.startswith("/sys/fs/cgroup"):
            out[m.mount_point] = (m.mount_point, m.fstype, m.root, m.super_options)
    return list(out.values())


def _mount_cgroup(rootfs: str, m: dict[str, Any], fresh: bool) -> None:
    """The container's cgroups at the destination, as runc shows them.

    In a new cgroup namespace (``fresh``) the cgroup file systems are mounted anew: their root is
    then the namespace's root, the container's own cgroup. Without one, the container's cgroup
    directories are bind-mounted from the agent's mounts.
    """
    where = f"mount {m['destination']}"
    dest = _step(where, mkdir_all, rootfs, m["destination"])
    own = _own_cgroups()
    mounts = _cgroup_mounts()
    flags = m["flags"] & ~linux.MS_RDONLY
    if len(mounts) == 1 and mounts[0][1] == "cgroup2":
        point, _, root, _ = mounts[0]
        if fresh:
            _step(where, linux.mount, "cgroup", dest, "cgroup2", m["flags"])
        else:
            _bind_cgroup(dest, _visible(point, root, own.get("", "/"), where), m["flags"], where)
        return
    _step(where, linux.mount, "tmpfs", dest, "tmpfs", flags, "mode=755")
    binds = []  # their flags are set below, all at once where the kernel can
    for point, fstype, root, opts in mounts:
        name = os.path.basename(point)
        if not name or point == "/sys/fs/cgroup" or fstype == "cgroup2":
            continue  # hybrid: runc shows the v1 hierarchies only
        controllers = _controllers_of(opts, own)
        if controllers is None or controllers not in own:
            continue
        sub = os.path.join(dest, name)
        os.makedirs(sub, exist_ok=True)
        if fresh:
            data = ",".join(o for o in opts.split(",") if o not in ("rw", "ro"))
            _step(where, linux.mount, "cgroup", sub, "cgroup", m["flags"], data)
        else:
            _step(where, linux.mount, _visible(point, root, own[controllers], where), sub, None,
                  linux.MS_BIND | linux.MS_REC)
            binds.append(sub)
        if "," in name:
            for alias in name.split(","):
                if not os.path.lexists(os.path.join(dest, alias)):
                    os.symlink(name, os.path.join(dest, alias))
    if binds:
        _bind_flags(dest, binds, m["flags"], where)


def _bind_flags(dest: str, binds: list[str], flags: int, where: str) -> None:
    """Give the cgroup binds under the tmpfs at ``dest`` the mount's flags. The tmpfs stays
    writable, as runc leaves it."""
    try:  # every bind at once (and the tmpfs, made writable again)
        linux.mount_setattr(dest, *_mount_attrs(flags))
        if flags & linux.MS_RDONLY:
            linux.mount_setattr(dest, 0, linux.MOUNT_ATTR_RDONLY, recursive=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            raise SetupError(f"{where}: {exc.strerror}") from None
        for sub in binds:  # before Linux 5.12 (or under a seccomp filter that refuses it)
            _step(where, linux.mount, None, sub, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


_ATTRS = [(linux.MS_RDONLY, linux.MOUNT_ATTR_RDONLY), (linux.MS_NOSUID, linux.MOUNT_ATTR_NOSUID),
          (linux.MS_NODEV, linux.MOUNT_ATTR_NODEV), (linux.MS_NOEXEC, linux.MOUNT_ATTR_NOEXEC),
          (linux.MS_NODIRATIME, linux.MOUNT_ATTR_NODIRATIME)]


def _mount_attrs(flags: int) -> tuple[int, int]:
    """(attr_set, attr_clr) for mount_setattr that leave a mount as a bind remount with ``flags``
    would: the flags given set, the others cleared, relatime unless noatime or strictatime."""
    attr_set = sum(attr for ms, attr in _ATTRS if flags & ms)
    attr_clr = sum(attr for ms, attr in _ATTRS if not flags & ms) | linux.MOUNT_ATTR__ATIME
    if flags & linux.MS_NOATIME:
        attr_set |= linux.MOUNT_ATTR_NOATIME
    elif flags & linux.MS_STRICTATIME:
        attr_set |= linux.MOUNT_ATTR_STRICTATIME
    return attr_set, attr_clr


def _visible(point: str, root: str, path: str, where: str) -> str:
    """Where cgroup ``path`` (from /proc/self/cgroup) is under a mount of that hierarchy at
    ``point`` whose root (mountinfo's fourth field) is ``root``."""
    if root == "/":
        return point + path if path != "/" else point
    if path == root:
        return point
    if path.startswith(root + "/"):
        return point + path[len(root):]
    raise SetupError(f"{where}: cgroup {path} is not below the root {root} of the mount at {point}")


def _controllers_of(opts: str, own: dict[str, str]) -> str | None:
    words = set(opts.split(","))
    for controllers in own:
        if controllers and set(controllers.split(",")) <= words:
            return controllers
    return None


def _bind_cgroup(dest: str, source: str, flags: int, where: str) -> None:
    _step(where, linux.mount, source, dest, None, linux.MS_BIND | linux.MS_REC)
    _step(where, linux.mount, None, dest, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _default_devices(dev: str, fresh: bool) -> None:
    """runc's default nodes and links in ``dev`` (the container's /dev, resolved in the rootfs),
    each made by name under one directory fd.

    In a tmpfs this init has just mounted there (``fresh``), a name that exists is one the spec
    mounted something at: it is left to that mount. In a /dev that comes with the rootfs, an
    existing node is replaced and owned by root; an existing link is kept.
    """
    fd = _step("open /dev", os.open, dev, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_RDONLY)
    try:
        for path, major, minor in DEFAULT_DEVICES:
            _default_node(fd, dev, path, major, minor, fresh)
        links = [(target, os.path.basename(link)) for target, link in DEV_LINKS]
        if os.path.exists("/proc/kcore"):
            links.append(("/proc/kcore", "core"))
        for target, name in links:
            try:
                os.symlink(target, name, dir_fd=fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise SetupError(f"symlink /dev/{name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _default_node(fd: int, dev: str, path: str, major: int, minor: int, fresh: bool) -> None:
    name = os.path.basename(path)
    try:
        if not fresh:
            _unlink_at(name, fd)
        os.mknod(name, stat.S_IFCHR | 0o666, os.makedev(major, minor), dir_fd=fd)
    except FileExistsError:
        return  # fresh: the spec mounted something here
    except PermissionError:  # no CAP_MKNOD: bind the host's node, as runc does
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
        _step(f"device {path}", linux.mount, path, os.path.join(dev, name), None, linux.MS_BIND)
        return
    except OSError as exc:
        raise SetupError(f"device {path}: {exc.strerror}") from None
    if not fresh:  # a setgid /dev in the image would give the node its group
        os.chown(name, 0, 0, dir_fd=fd, follow_symlinks=False)


def _unlink_at(name: str, fd: int) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass


def _make_device(rootfs: str, dev: dict[str, Any]) -> None:
    where = f"device {dev['path']}"
    full = secure_join(rootfs, dev["path"])
    _step(where, os.makedirs, os.path.dirname(full), 0o755, True)
    if os.path.lexists(full):
        _step(where, os.unlink, full)
    try:
        os.mknod(full, dev["mode"], os.makedev(dev["major"], dev["minor"]))
    except PermissionError:  # no CAP_MKNOD: bind the host's node, as runc does
        os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o644))
        _step(where, linux.mount, dev["path"], full, None, linux.MS_BIND)
        return
    except OSError as exc:
        raise SetupError(f"{where}: {exc.strerror}") from None
    _step(where, os.chown, full, dev["uid"], dev["gid"])


def _bind_console(rootfs: str) -> None:
    full = secure_join(rootfs, "/dev/console")
    if not os.path.lexists(full):
        os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o600))
    _step("bind /dev/console", linux.mount, os.ttyname(0), full, None, linux.MS_BIND)


def _pivot(rootfs: str) -> None:
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY)
    os.fchdir(new)
    try:
        linux.pivot_root(".", ".")
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise SetupError(f"pivot_root: {exc.strerror}") from None
        _move_root()  # the guest root is an initramfs: pivot_root refuses it
    else:
        os.fchdir(old)
        _step("detach the old root", linux.mount, None, ".", None, linux.MS_SLAVE | linux.MS_REC)
        _step("detach the old root", linux.umount2, ".", linux.MNT_DETACH)
        os.chdir("/")
    os.close(old)
    os.close(new)


def _move_root() -> None:
    _step("move the root", linux.mount, ".", "/", None, linux.MS_MOVE)
    _step("chroot", os.chroot, ".")
    os.chdir("/")


def _kept_flags(path: str) -> int:
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEEP_FLAGS if f_flag & st)


def _finish_rootfs(cfg: dict[str, Any]) -> None:
    for key, value in cfg["sysctl"].items():
        path = "/proc/sys/" + key.replace(".", "/")
        with open(path, "w") as f:
            _step(f"sysctl {key}", f.write, value)
    for path in cfg["readonly_paths"]:
        _readonly(path)
    for path in cfg["masked_paths"]:
        _mask(path)
    if cfg["readonly_root"]:
        _step("readonly root", linux.mount, None, "/", None,
              linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | _kept_flags("/"))


def _readonly(path: str) -> None:
    try:
        linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SetupError(f"readonly path {path}: {exc.strerror}") from None
    _step(f"readonly path {path}", linux.mount, None, path, None,
          linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_REC | _kept_flags(path))


def _mask(path: str) -> None:
    try:
        if os.path.isdir(path):
            linux.mount("tmpfs", path, "tmpfs", linux.MS_RDONLY)
        else:
            linux.mount("/dev/null", path, None, linux.MS_BIND)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SetupError(f"masked path {path}: {exc.strerror}") from None


# --- the process --------------------------------------------------------------------------------

def _exec_process(proc: dict[str, Any], sync: socket.socket, stdio: list[int] | None, wait_start: bool,
                  reported: int = -1, seccomp_cfg: dict[str, Any] | None = None) -> NoReturn:
    if stdio is not None:
        _setup_stdio(stdio, proc["terminal"], sync)
    if proc["oom_score_adj"] is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            _step("oom_score_adj", f.write, str(proc["oom_score_adj"]))
    for res, soft, hard in proc["rlimits"]:
        _step(f"setrlimit {res}", resource.setrlimit, res, (soft, hard))
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
        _step("no_new_privs", linux.prctl, linux.PR_SET_NO_NEW_PRIVS, 1)
    path = _look_path(proc["args"][0], env)  # as runc: a missing program fails the create
    if reported >= 0:
        _wait_eof(reported)  # the pid message goes first
    if wait_start:
        send(sync, {"ready": True})
        if sync.recv(16) != b"start":
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


def _reset_signals() -> None:
    """Un-ignore signals (exec resets caught ones itself) and unblock all.

    glibc keeps its internal signals (32 up to SIGRTMIN) out of valid_signals() and out of
    sigaction(); its posix_spawn, which started the spawner, leaves them ignored. Those go
    through the raw system call.
    """
    for sig in signal.valid_signals():
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
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


def _become(user: User, proc: dict[str, Any]) -> None:
    caps = proc["caps"] if proc["caps_given"] else None
    if caps is not None:
        for cap in range(linux.cap_last_cap() + 1):
            if not caps["bounding"] >> cap & 1:
                _step("drop bounding capability", linux.prctl, linux.PR_CAPBSET_DROP, cap)
        linux.prctl(linux.PR_SET_KEEPCAPS, 1)
    _step("setgroups", os.setgroups, user.groups)
    _step("setgid", os.setgid, user.gid)
    _step("setuid", os.setuid, user.uid)
    if caps is None:
        return
    linux.prctl(linux.PR_SET_KEEPCAPS, 0)
    _step("capset", linux.capset, caps["effective"], caps["permitted"], caps["inheritable"])
    for cap in range(64):
        if caps["ambient"] >> cap & 1:
            try:  # as runc: a cap not in the inheritable set cannot be ambient; warn-free skip
                linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_RAISE, cap)
            except OSError:
                pass


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
