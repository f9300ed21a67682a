"""PID-1 duties of the agent inside the guest.

Called by ``agent/__main__.py`` when ``os.getpid() == 1``, before grpc is imported (a fork made
here happens while the process is still single-threaded)::

    from agent import init
    if os.getpid() == 1:
        init.pid1_setup(init.read_cmdline())
    ...
    init.poweroff()          # when the agent exits or is told to (also available as shutdown())

What it does, in kernel order and with plain syscalls (agent.linux) wherever that is easy:

1. mounts /proc, /sys, /dev (devtmpfs: Debian's cloud kernel has DEVTMPFS_MOUNT off), /dev/pts,
   /dev/shm, /run, /tmp and cgroup2 at /sys/fs/cgroup (with the controllers enabled for children);
2. loads the virtio/vsock/virtiofs kernel modules with ``finit_module`` in modules.dep order
   (falling back to ``modprobe``); later modules (overlay, veth, bridge, ...) are autoloaded by
   the kernel through /sbin/modprobe;
3. brings up ``lo`` and ``eth0`` through rtnetlink with the address that QEMU user networking
   expects (10.0.2.15/24 via 10.0.2.2; ``agent.ip=ADDR/LEN``, ``agent.gw=ADDR`` or
   ``agent.ip=none`` on the kernel command line change that);
4. starts a debug console when asked: a respawned shell on the serial console (the last
   ``console=``, or ``agent.debug_console_dev``) for ``agent.debug_console``, and a shell per
   connection on vsock port ``agent.debug_console_vport`` when that is given.

Zombie reaping is the agent's own reaper's job. Every step is best effort: a failure is logged to
stderr (the serial console) and the agent still starts, so that it can report what is wrong.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import time

from agent import linux
from agent.bootpolicy import BootPolicy
from agent.linux import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RELATIME

__all__ = ["read_cmdline", "pid1_setup", "poweroff", "shutdown", "load_modules", "setup_network"]

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Drivers loaded at boot: device drivers must be present before the devices can be used; file
# systems and link types are autoloaded by the kernel on first use. Not vsock_loopback: with it, a
# process in a container could connect to the agent's vsock port through CID 1.
BOOT_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_rng",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "overlay",
)


def _log(msg: str) -> None:
    try:
        sys.stderr.write(f"agent-init: {msg}\n")
        sys.stderr.flush()
    except OSError:
        pass


# --------------------------------------------------------------------------- kernel command line


def read_cmdline(path: str = "/proc/cmdline") -> dict[str, str]:
    """Parse /proc/cmdline. As PID 1 before /proc is mounted, mount it first."""
    if not os.path.exists(path) and path == "/proc/cmdline" and os.getpid() == 1:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return linux.read_cmdline(path)


# --------------------------------------------------------------------------- mounts


def _mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> bool:
    os.makedirs(target, exist_ok=True)
    try:
        linux.mount(source, target, fstype, flags, data or None)
    except OSError as exc:
        if exc.errno == errno.EBUSY:  # already mounted
            return True
        _log(f"mount {fstype} on {target}: {os.strerror(exc.errno or 0)}")
        return False
    return True


def _is_mountpoint(path: str) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def mount_basics(unified_cgroup_hierarchy: bool = True) -> None:
    """The basic file systems; cgroup2 at /sys/fs/cgroup, or with ``unified_cgroup_hierarchy``
    false (agent.unified_cgroup_hierarchy=0, Kata's default) the cgroup v1 hierarchies."""
    nsd = MS_NOSUID | MS_NODEV
    table = [
        ("proc", "/proc", "proc", nsd | MS_NOEXEC, None),
        ("sysfs", "/sys", "sysfs", nsd | MS_NOEXEC, None),
        ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ("shm", "/dev/shm", "tmpfs", nsd, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", nsd, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nsd, "mode=1777"),
        # favordynmods (Linux 6.0): a process moves into a cgroup without waiting for an RCU
        # grace period, so a container's init can move itself (agent.runtime.container).
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nsd | MS_NOEXEC | MS_RELATIME, "nsdelegate,favordynmods"),
    ]
    if not unified_cgroup_hierarchy:
        table = table[:-1] + [("tmpfs", "/sys/fs/cgroup", "tmpfs", nsd | MS_NOEXEC, "mode=0755")]
    for source, target, fstype, flags, data in table:
        if target != "/" and _is_mountpoint(target):
            continue
        if not _mount(source, target, fstype, flags, data) and fstype == "cgroup2":
            if not _mount(source, target, fstype, flags, "nsdelegate"):  # before Linux 6.0
                _mount(source, target, fstype, flags, None)
    for name, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                       ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        try:
            os.symlink(dest, f"/dev/{name}")
        except OSError:
            pass
    if not os.path.exists("/dev/ptmx"):
        try:
            os.symlink("pts/ptmx", "/dev/ptmx")
        except OSError:
            pass
    if not unified_cgroup_hierarchy:
        mount_cgroup_v1()
        return
    # Hand every available cgroup v2 controller down to child cgroups.
    try:
        with open("/sys/fs/cgroup/cgroup.controllers") as f:
            ctrls = f.read().split()
        with open("/sys/fs/cgroup/cgroup.subtree_control", "w") as f:
            f.write(" ".join("+" + c for c in ctrls))
    except OSError as e:
        _log(f"cgroup2 controllers: {e}")


# Controllers sharing one v1 hierarchy, as distributions (and runc's expectations) have them.
V1_COMBINED = (("cpu", "cpuacct"), ("net_cls", "net_prio"))


def v1_hierarchies(proc_cgroups: str) -> list[tuple[str, ...]]:
    """The v1 hierarchies to mount from /proc/cgroups' enabled controllers, combined ones together."""
    enabled = [f[0] for f in (line.split() for line in proc_cgroups.splitlines())
               if len(f) == 4 and not f[0].startswith("#") and f[3] == "1"]
    out: list[tuple[str, ...]] = []
    for name in enabled:
        group = next((g for g in V1_COMBINED if name in g), (name,))
        group = tuple(c for c in group if c in enabled)
        if group not in out:
            out.append(group)
    return out


def mount_cgroup_v1() -> None:
    """One cgroup v1 hierarchy per controller (cpu,cpuacct and net_cls,net_prio together, with a
    symlink per name) under the tmpfs at /sys/fs/cgroup."""
    try:
        with open("/proc/cgroups") as f:
            groups = v1_hierarchies(f.read())
    except OSError as e:
        _log(f"cgroup v1: {e}")
        return
    for group in groups:
        name = ",".join(group)
        target = f"/sys/fs/cgroup/{name}"
        if _is_mountpoint(target) or not _mount("cgroup", target, "cgroup",
                                                 MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME, name):
            continue
        for member in group if len(group) > 1 else ():
            try:
                os.symlink(name, f"/sys/fs/cgroup/{member}")
            except OSError:
                pass


# --------------------------------------------------------------------------- kernel modules


def _modules_dir() -> str:
    return f"/lib/modules/{os.uname().release}"


def _finit_module(path: str) -> int:
    """0 on success (or already loaded), else errno."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return e.errno or errno.EIO
    try:
        linux.finit_module(fd)
    except OSError as e:
        return 0 if e.errno == errno.EEXIST else e.errno or errno.EIO
    finally:
        os.close(fd)
    return 0


def load_modules(names: tuple[str, ...] | list[str] = BOOT_MODULES) -> list[str]:
    """Load modules and their dependencies; returns the names that failed.

    Built-in or absent modules are skipped silently (not an error: the kernel may have them
    built in). Uses modules.dep from depmod; falls back to modprobe.
    """
    mdir = _modules_dir()
    dep: dict[str, list[str]] = {}
    byname: dict[str, str] = {}
    try:
        with open(os.path.join(mdir, "modules.dep")) as f:
            for line in f:
                path, _, rest = line.partition(":")
                dep[path] = rest.split()
                byname[os.path.basename(path).split(".ko")[0].replace("-", "_")] = path
    except OSError:
        pass
    loaded: set[str] = set()
    try:
        with open("/proc/modules") as f:
            loaded = {line.split(" ", 1)[0] for line in f}
    except OSError:
        pass
    failed: list[str] = []

    def load(path: str, stack: tuple[str, ...] = ()) -> bool:
        name = os.path.basename(path).split(".ko")[0].replace("-", "_")
        if name in loaded or path in stack:
            return True
        for d in reversed(dep.get(path, [])):  # modules.dep lists the deepest dependency last
            load(d, stack + (path,))
        err = _finit_module(os.path.join(mdir, path))
        if err:
            _log(f"finit_module {name}: {os.strerror(err)}")
            return False
        loaded.add(name)
        return True

    for name in names:
        key = name.replace("-", "_")
        if key in loaded:
            continue
        path = byname.get(key)
        if path is None:
            continue  # built in, or not shipped in this image
        if not load(path):
            import subprocess

            if subprocess.call(["modprobe", "-q", name], env={"PATH": DEFAULT_PATH}) != 0:
                failed.append(name)
    return failed


# --------------------------------------------------------------------------- network (rtnetlink)
# Raw rtnetlink, not pyroute2: these three requests take 3 ms in the guest under TCG, importing
# pyroute2 1.6-2.2 s (measured 2026-12-02); only the network RPCs need pyroute2.

RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 20, 24
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
NLMSG_ERROR = 2
IFF_UP = 0x1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RTN_UNICAST = 254, 3, 0, 253, 1


def _rta(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


class _Netlink:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes) -> int:
        """Send one request with NLM_F_ACK; return 0 or the errno of the kernel's answer."""
        self.seq += 1
        hdr = struct.pack("=LHHLL", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0)
        self.sock.send(hdr + body)
        while True:
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype, _, seq, _ = struct.unpack_from("=LHHLL", data, off)
                if mtype == NLMSG_ERROR and seq == self.seq:
                    (code,) = struct.unpack_from("=i", data, off + 16)
                    return -code
                off += (length + 3) & ~3
                if length == 0:
                    break

    def link_up(self, index: int) -> int:
        body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)
        return self.request(RTM_NEWLINK, 0, body)

    def add_addr(self, index: int, addr: str, prefix: int) -> int:
        raw = socket.inet_aton(addr)
        body = struct.pack("=BBBBI", socket.AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, index)
        body += _rta(IFA_LOCAL, raw) + _rta(IFA_ADDRESS, raw)
        return self.request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, body)

    def add_default_route(self, index: int, gateway: str) -> int:
        body = struct.pack("=BBBBBBBBI", socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT,
                           RT_SCOPE_UNIVERSE, RTN_UNICAST, 0)
        body += _rta(RTA_GATEWAY, socket.inet_aton(gateway)) + _rta(RTA_OIF, struct.pack("=I", index))
        return self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)


def _wait_for(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def setup_network(cmdline: dict[str, str]) -> None:
    """lo up; eth0 (``agent.netdev``) up with ``agent.ip`` (default 10.0.2.15/24) and a default
    route via ``agent.gw`` (default 10.0.2.2): QEMU user networking's fixed plan."""
    nl = _Netlink()
    try:
        err = nl.link_up(socket.if_nametoindex("lo"))
        if err:
            _log(f"lo up: {os.strerror(err)}")
        ip = cmdline.get("agent.ip", "10.0.2.15/24")
        if ip in ("none", "off", ""):
            return
        dev = cmdline.get("agent.netdev", "eth0")
        if not _wait_for(f"/sys/class/net/{dev}", 2.0):
            _log(f"no {dev}: the guest has no NIC, only lo is up")
            return
        index = socket.if_nametoindex(dev)
        addr, _, plen = ip.partition("/")
        for what, err in (("up", nl.link_up(index)),
                          ("address", nl.add_addr(index, addr, int(plen or 24)))):
            if err and err != errno.EEXIST:
                _log(f"{dev} {what}: {os.strerror(err)}")
        gw = cmdline.get("agent.gw", "10.0.2.2")
        if gw not in ("none", ""):
            err = nl.add_default_route(index, gw)
            if err and err != errno.EEXIST:
                _log(f"default route via {gw}: {os.strerror(err)}")
    finally:
        nl.close()


# --------------------------------------------------------------------------- debug console


def _console_device(cmdline: dict[str, str]) -> str:
    dev = cmdline.get("agent.debug_console_dev") or cmdline.get("console", "")
    dev = dev.split(",")[0]
    if not dev:
        dev = "ttyAMA0" if os.uname().machine == "aarch64" else "ttyS0"
    return dev if dev.startswith("/") else f"/dev/{dev}"


def _exec_shell(fd: int | None, tty: str | None) -> None:
    """In a forked child: new session, stdio on fd (or the tty as controlling terminal), exec sh."""
    try:
        os.setsid()
        if tty is not None:
            fd = os.open(tty, os.O_RDWR)
            import fcntl
            import termios

            fcntl.ioctl(fd, termios.TIOCSCTTY, 1)
        assert fd is not None
        for i in range(3):
            os.dup2(fd, i)
        env = {"PATH": DEFAULT_PATH, "HOME": "/root", "TERM": "vt100", "PS1": "[kata-guest \\w]# "}
        sh = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        os.execve(sh, [sh, "-i"], env)
    finally:
        os._exit(127)


def debug_console_allowed(boot_policy: BootPolicy) -> bool:
    """Whether the boot policy (agent.policy / --policy-file) lets the debug console start: its
    ``DebugConsole`` method in JSON rules, its ``DebugConsoleRequest`` rule in Rego (undefined:
    denied, as any undefined rule). No policy: allowed. A policy that cannot be read: denied (the
    agent then refuses to serve anyway). The parsed policy stays in ``boot_policy`` for the agent."""
    try:
        parsed = boot_policy.get()
        if parsed is None:
            return True
        from agent import policy

        decision = parsed.decide(policy.DEBUG_CONSOLE, None)
    except Exception as exc:  # noqa: BLE001 - any failure keeps the shell closed
        _log(f"debug console not started: the boot policy cannot be used: {exc}")
        return False
    if not decision.allowed:
        _log(f"debug console not started: denied by the boot policy ({decision.rule})")
    return decision.allowed


def start_debug_console(cmdline: dict[str, str], settings) -> list[int]:
    """Fork supervisors (single-threaded, before grpc exists) that respawn a shell on the serial
    console (settings.debug_console), and serve one per connection on vsock port
    settings.debug_console_vport. Returns their pids."""
    pids: list[int] = []
    tty = _console_device(cmdline)
    if settings.debug_console and os.path.exists(tty):
        pid = os.fork()
        if pid == 0:
            try:
                os.setsid()
                while True:
                    child = os.fork()
                    if child == 0:
                        _exec_shell(None, tty)
                    try:
                        os.waitpid(child, 0)
                    except ChildProcessError:
                        pass
                    time.sleep(0.5)
            finally:
                os._exit(0)
        pids.append(pid)
        _log(f"debug console on {tty} (pid {pid})")
    vport = settings.debug_console_vport
    if vport and hasattr(socket, "AF_VSOCK"):
        try:
            srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            srv.bind((socket.VMADDR_CID_ANY, vport))
            srv.listen(4)
        except OSError as e:
            _log(f"debug console on vsock port {vport}: {e}")
        else:
            pid = os.fork()
            if pid == 0:
                try:
                    import signal

                    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # auto-reap the shells
                    while True:
                        conn, _ = srv.accept()
                        if os.fork() == 0:
                            srv.close()
                            _exec_shell(conn.fileno(), None)
                        conn.close()
                finally:
                    os._exit(0)
            srv.close()
            pids.append(pid)
            _log(f"debug console on vsock port {vport} (pid {pid})")
    return pids


# --------------------------------------------------------------------------- entry points


def _merge_cmdline(full: dict[str, str], given: dict[str, str]) -> dict[str, str]:
    """The full kernel command line plus the caller's keys. agent/config.py hands over only the
    ``agent.*`` keys with the prefix stripped (``debug_console``): put the prefix back."""
    out = dict(full)
    for key, value in given.items():
        if not key.startswith("agent.") and key not in full:
            key = f"agent.{key}"
        out.setdefault(key, value)
    return out


def pid1_setup(cmdline: dict[str, str] | None = None, settings=None,
               boot_policy: BootPolicy | None = None) -> None:
    """Everything PID 1 must do before the agent serves. Safe to call twice.

    ``cmdline`` may be the full kernel command line (read_cmdline()) or agent/config.py's
    ``agent.*`` keys without the prefix; /proc/cmdline is read here either way, once /proc is up.
    ``settings`` is the agent's agent.config.Config; without it, it is read from the command line.
    ``boot_policy`` is the agent's (read when the debug console asks it, and kept parsed for the
    agent); without it, it is settings.policy_file's.
    """
    t0 = time.monotonic()
    os.environ.setdefault("PATH", DEFAULT_PATH)
    os.environ.setdefault("HOME", "/root")
    os.umask(0o022)
    cmdline = _merge_cmdline(read_cmdline(), cmdline or {})  # mounts /proc first when needed
    if settings is None:
        from agent import config

        settings = config.from_cmdline(config.agent_keys(cmdline))
    mount_basics(settings.unified_cgroup_hierarchy)
    t1 = time.monotonic()
    extra = [m for m in cmdline.get("agent.modules", "").split(",") if m]
    failed = load_modules(list(BOOT_MODULES) + extra)
    if failed:
        _log(f"modules not loaded: {', '.join(failed)}")
    t2 = time.monotonic()
    try:
        setup_network(cmdline)
    except OSError as e:
        _log(f"network: {e}")
    t3 = time.monotonic()
    try:
        with open("/etc/hostname") as f:
            name = f.read().strip()
        if name:
            socket.sethostname(name)
    except OSError:
        pass
    try:
        from agent import identity

        identity.ensure_machine_id()
    except OSError as e:
        _log(f"machine-id: {e}")
    if boot_policy is None:
        boot_policy = BootPolicy(settings.policy_file)
    if (settings.debug_console or settings.debug_console_vport) and debug_console_allowed(boot_policy):
        start_debug_console(cmdline, settings)
    _log(f"pid1 set-up {time.monotonic() - t0:.3f}s (mounts {t1 - t0:.3f}, modules {t2 - t1:.3f}, "
         f"network {t3 - t2:.3f})")
    from agent import boottrace

    boottrace.mark("pid1-setup", t0, s=f"{time.monotonic() - t0:.6f}")


def poweroff(graceful_timeout: float = 1.0) -> None:
    """Stop every other process, sync, and power the VM off. Never returns when PID 1."""
    import signal

    if os.getpid() != 1:
        raise RuntimeError("poweroff() is PID 1's job")
    try:
        os.kill(-1, signal.SIGTERM)
        deadline = time.monotonic() + graceful_timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(-1, os.WNOHANG) == (0, 0):
                    time.sleep(0.02)
            except ChildProcessError:
                break
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    os.sync()
    _log("power off")
    for cmd in (linux.RB_POWER_OFF, linux.RB_AUTOBOOT):
        # No power-off method (no ACPI / PSCI): reboot; QEMU runs with -no-reboot and exits.
        try:
            linux.reboot(cmd)
        except OSError as exc:
            _log(f"reboot: {exc}")
    os._exit(1)


shutdown = poweroff
