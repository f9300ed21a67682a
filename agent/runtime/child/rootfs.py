"""The container's rootfs, made by its init: mounts (cgroup mounts as runc shows them), device
nodes, the console, pivot_root, sysctls, read-only and masked paths, the read-only root.

``prepare`` runs before pivot_root, ``finish`` after it (agent.runtime.child.container_init).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any

from agent import linux
from agent.runtime.child.common import SetupError, new_ns, step
from agent.runtime.paths import mkdir_all, secure_join

# In runc's order (specconv.AllowedDevices): in a user namespace they are bind mounts, listed so.
DEFAULT_DEVICES = [("/dev/null", 1, 3), ("/dev/random", 1, 8), ("/dev/full", 1, 7),
                   ("/dev/tty", 5, 0), ("/dev/zero", 1, 5), ("/dev/urandom", 1, 9)]
DEV_LINKS = [("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
             ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"),
             ("pts/ptmx", "/dev/ptmx")]


# statvfs flags -> mount flags, kept when a mount is remounted read-only.
_KEEP_FLAGS = [(os.ST_NOSUID, linux.MS_NOSUID), (os.ST_NODEV, linux.MS_NODEV), (os.ST_NOEXEC, linux.MS_NOEXEC),
               (os.ST_NOATIME, linux.MS_NOATIME), (os.ST_NODIRATIME, linux.MS_NODIRATIME),
               (os.ST_RELATIME, linux.MS_RELATIME)]


def prepare(cfg: dict[str, Any], terminal: bool, join: Callable[[], None]) -> None:
    """Mount, make devices and the console under the rootfs; ``join`` enters the cgroup (before
    the first cgroup mount or device node, which depend on it)."""
    rootfs = cfg["rootfs"]
    step("set the root propagation", linux.mount, None, "/", None, cfg["root_propagation"])
    step(f"bind {rootfs}", linux.mount, rootfs, rootfs, None, linux.MS_BIND | linux.MS_REC)
    new_cgroupns = new_ns(cfg["namespaces"], linux.CLONE_NEWCGROUP)
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
        dev = fresh_dev or step("mkdir /dev", mkdir_all, rootfs, "/dev")
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
    if "fd" in m:  # mounted already, detached (agent.runtime.child.userns)
        dest = step(where, mkdir_all, rootfs, m["destination"])
        step(where, linux.move_mount_fd, m["fd"], dest)
        os.close(m["fd"])
    elif flags & linux.MS_BIND:
        dest = _bind_target(rootfs, m)
        step(where, linux.mount, m["source"], dest, None, flags & (linux.MS_BIND | linux.MS_REC))
        if flags & ~(linux.MS_BIND | linux.MS_REC):
            step(where, linux.mount, None, dest, None, flags | linux.MS_REMOUNT)
    else:
        dest = step(where, mkdir_all, rootfs, m["destination"])
        try:
            linux.mount(m["source"], dest, m["type"], flags, m["data"] or None)
        except OSError as exc:
            if not (m["type"] == "sysfs" and exc.errno == errno.EPERM):
                raise SetupError(f"{where}: {exc.strerror}") from None
            _bind_sys(dest, flags, where)
    for p in m["propagation"]:
        step(where, linux.mount, None, dest, None, p)
    return dest


def _bind_sys(dest: str, flags: int, where: str) -> None:
    """sysfs refuses a mount from a user namespace that does not own the network namespace (the
    container shares the agent's): the host's /sys is bound instead, with the mount's flags on
    its top, as `runc spec --rootless` writes it (rbind) and as runc falls back for cgroup2."""
    step(where, linux.mount, "/sys", dest, None, linux.MS_BIND | linux.MS_REC)
    step(where, linux.mount, None, dest, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _bind_target(rootfs: str, m: dict[str, Any]) -> str:
    dest = secure_join(rootfs, m["destination"])
    src_is_dir = step(f"mount {m['destination']}: source {m['source']}", os.stat, m["source"]).st_mode
    if stat.S_ISDIR(src_is_dir):
        step(f"mount {m['destination']}", os.makedirs, dest, 0o755, True)
    elif not os.path.lexists(dest):
        step(f"mount {m['destination']}", os.makedirs, os.path.dirname(dest), 0o755, True)
        os.close(step(f"mount {m['destination']}", os.open, dest, os.O_CREAT | os.O_WRONLY, 0o644))
    return dest


# What ``learn`` read ahead: (the cgroup mounts, this process's cgroups), or None.
_learned: tuple[list[tuple[str, str, str, str]], dict[str, str]] | None = None


def learn() -> None:
    """Read the cgroup mounts and this process's cgroups ahead, once in the spawner before it
    forks (each container's init paid 0.3-0.4 ms for it in a fresh fork). They do not change
    meanwhile: the guest's cgroup file systems are mounted before the spawner starts
    (agent.init), and the agent's cgroup layout relies on that too; the hierarchies a process
    is in are the same for the spawner and its forks. A container in a new cgroup namespace needs only which
    hierarchies there are; one without reads its own cgroups again once it joined them."""
    global _learned
    try:
        _learned = (_cgroup_mounts(), _own_cgroups())
    except OSError:
        _learned = None  # read at the mount, which then fails with the reason


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
    dest = step(where, mkdir_all, rootfs, m["destination"])
    mounts, own = _learned or (_cgroup_mounts(), {})
    if not fresh or not own:  # the paths are needed: those of the cgroup joined since
        own = _own_cgroups()
    flags = m["flags"] & ~linux.MS_RDONLY
    if len(mounts) == 1 and mounts[0][1] == "cgroup2":
        point, _, root, _ = mounts[0]
        if fresh:
            step(where, linux.mount, "cgroup", dest, "cgroup2", m["flags"])
        else:
            _bind_cgroup(dest, _visible(point, root, own.get("", "/"), where), m["flags"], where)
        return
    step(where, linux.mount, "tmpfs", dest, "tmpfs", flags, "mode=755")
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
            step(where, linux.mount, "cgroup", sub, "cgroup", m["flags"], data)
        else:
            step(where, linux.mount, _visible(point, root, own[controllers], where), sub, None,
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
        linux.mount_setattr(dest, *mount_attrs(flags))
        if flags & linux.MS_RDONLY:
            linux.mount_setattr(dest, 0, linux.MOUNT_ATTR_RDONLY, recursive=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
            raise SetupError(f"{where}: {exc.strerror}") from None
        for sub in binds:  # before Linux 5.12 (or under a seccomp filter that refuses it)
            step(where, linux.mount, None, sub, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


_ATTRS = [(linux.MS_RDONLY, linux.MOUNT_ATTR_RDONLY), (linux.MS_NOSUID, linux.MOUNT_ATTR_NOSUID),
          (linux.MS_NODEV, linux.MOUNT_ATTR_NODEV), (linux.MS_NOEXEC, linux.MOUNT_ATTR_NOEXEC),
          (linux.MS_NODIRATIME, linux.MOUNT_ATTR_NODIRATIME)]


def mount_attrs(flags: int) -> tuple[int, int]:
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
    step(where, linux.mount, source, dest, None, linux.MS_BIND | linux.MS_REC)
    step(where, linux.mount, None, dest, None, linux.MS_BIND | linux.MS_REMOUNT | flags)


def _default_devices(dev: str, fresh: bool) -> None:
    """runc's default nodes and links in ``dev`` (the container's /dev, resolved in the rootfs),
    each made by name under one directory fd.

    In a tmpfs this init has just mounted there (``fresh``), a name that exists is one the spec
    mounted something at: it is left to that mount. In a /dev that comes with the rootfs, an
    existing node is replaced and owned by root; an existing link is kept.
    """
    fd = step("open /dev", os.open, dev, os.O_DIRECTORY | os.O_NOFOLLOW | os.O_RDONLY)
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
        step(f"device {path}", linux.mount, path, os.path.join(dev, name), None, linux.MS_BIND)
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
    step(where, os.makedirs, os.path.dirname(full), 0o755, True)
    if os.path.lexists(full):
        step(where, os.unlink, full)
    try:
        os.mknod(full, dev["mode"], os.makedev(dev["major"], dev["minor"]))
    except PermissionError:  # no CAP_MKNOD: bind the host's node, as runc does
        os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o644))
        step(where, linux.mount, dev["source"] or dev["path"], full, None, linux.MS_BIND)
        return
    except OSError as exc:
        raise SetupError(f"{where}: {exc.strerror}") from None
    step(where, os.chown, full, dev["uid"], dev["gid"])


def _bind_console(rootfs: str) -> None:
    full = secure_join(rootfs, "/dev/console")
    if not os.path.lexists(full):
        os.close(os.open(full, os.O_CREAT | os.O_WRONLY, 0o600))
    step("bind /dev/console", linux.mount, os.ttyname(0), full, None, linux.MS_BIND)


def pivot(rootfs: str) -> None:
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
        step("detach the old root", linux.mount, None, ".", None, linux.MS_SLAVE | linux.MS_REC)
        step("detach the old root", linux.umount2, ".", linux.MNT_DETACH)
        os.chdir("/")
    os.close(old)
    os.close(new)


def _move_root() -> None:
    step("move the root", linux.mount, ".", "/", None, linux.MS_MOVE)
    step("chroot", os.chroot, ".")
    os.chdir("/")


def _kept_flags(path: str) -> int:
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in _KEEP_FLAGS if f_flag & st)


def finish(cfg: dict[str, Any]) -> None:
    """After pivot_root: sysctls, read-only and masked paths, the read-only root."""
    for key, value in cfg["sysctl"].items():
        path = "/proc/sys/" + key.replace(".", "/")
        with open(path, "w") as f:
            step(f"sysctl {key}", f.write, value)
    for path in cfg["readonly_paths"]:
        _readonly(path)
    for path in cfg["masked_paths"]:
        _mask(path)
    if cfg["readonly_root"]:
        step("readonly root", linux.mount, None, "/", None,
              linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | _kept_flags("/"))


def _readonly(path: str) -> None:
    try:
        linux.mount(path, path, None, linux.MS_BIND | linux.MS_REC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SetupError(f"readonly path {path}: {exc.strerror}") from None
    step(f"readonly path {path}", linux.mount, None, path, None,
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
