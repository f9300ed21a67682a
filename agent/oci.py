"""grpc.Spec -> the runtime's container config: pure, no syscalls.

``validate(spec)`` checks everything the runtime relies on and raises ``InvalidArgument`` naming
the field (``OCI.Mounts[3].destination: not absolute``). ``convert(spec)`` then builds plain
dataclasses that the spawner receives as JSON (their fields as objects): numbers and flags are
computed here once, so the forked child only makes syscalls.
"""

from __future__ import annotations

import posixpath
import resource
import signal
from dataclasses import dataclass, field

from agent import linux
from agent.errors import InvalidArgument
from agent.protocols import oci_pb2
from agent.runtime import seccomp as seccomp_mod

NAMESPACES = {
    "pid": linux.CLONE_NEWPID, "network": linux.CLONE_NEWNET, "mount": linux.CLONE_NEWNS,
    "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS, "user": linux.CLONE_NEWUSER,
    "cgroup": linux.CLONE_NEWCGROUP,
}
# /proc/<pid>/ns/<name> for each namespace type, in the order a process joins them.
NS_FILES = {"user": "user", "cgroup": "cgroup", "ipc": "ipc", "uts": "uts", "network": "net",
            "pid": "pid", "mount": "mnt"}

CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]
CAP_NUMBERS = {f"CAP_{name}": i for i, name in enumerate(CAPABILITIES)}
CAP_SETS = ("Bounding", "Effective", "Inheritable", "Permitted", "Ambient")

# Linux resource numbers (the resource module lacks some, e.g. RLIMIT_LOCKS).
RLIMITS = {f"RLIMIT_{name}": i for i, name in enumerate((
    "CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE", "MEMLOCK", "AS", "LOCKS",
    "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME"))}

# Mount option words are agent.linux's (MOUNT_FLAGS, MOUNT_PROPAGATION, shared with storages);
# runc's tmpcopyup is not done here and is dropped.
IGNORED_OPTIONS = {"tmpcopyup"}
MOUNT_TYPES_NEEDING_SOURCE = {"bind"}
DEVICE_TYPES = {"c": 0o020000, "u": 0o020000, "b": 0o060000, "p": 0o010000}


@dataclass
class MountConfig:
    destination: str
    source: str
    type: str
    flags: int = 0
    data: str = ""
    propagation: list[int] = field(default_factory=list)

    @property
    def is_bind(self) -> bool:
        return bool(self.flags & linux.MS_BIND)


@dataclass
class DeviceConfig:
    path: str
    mode: int  # file type bits | permissions
    major: int
    minor: int
    uid: int
    gid: int


@dataclass
class ProcessConfig:
    args: list[str]
    env: list[str]
    cwd: str
    uid: int = 0
    gid: int = 0
    additional_gids: list[int] = field(default_factory=list)
    # A user name or "uid[:gid]" / "name[:group]" resolved in the container's /etc/passwd and /etc/group.
    user: str = ""
    terminal: bool = False
    console_size: tuple[int, int] = (0, 0)  # rows, columns
    caps: dict[str, int] = field(default_factory=dict)  # set name (lower case) -> mask
    caps_given: bool = False
    rlimits: list[tuple[int, int, int]] = field(default_factory=list)  # (resource, soft, hard)
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    umask: int = 0o022


@dataclass
class SyscallRule:
    names: list[str]
    action: int  # libseccomp action code, errno included
    args: list[tuple[int, int, int, int]] = field(default_factory=list)  # (index, operator, value, value2)


@dataclass
class SeccompConfig:
    default_action: int
    architectures: list[str] = field(default_factory=list)  # libseccomp names: x86_64, aarch64, ...
    flags: list[int] = field(default_factory=list)  # libseccomp filter attributes to set
    syscalls: list[SyscallRule] = field(default_factory=list)


@dataclass
class ContainerConfig:
    id: str
    rootfs: str
    readonly_root: bool
    hostname: str
    process: ProcessConfig
    # (clone flag, path): an empty path creates a new namespace, a path joins it.
    namespaces: list[tuple[int, str]] = field(default_factory=list)
    mounts: list[MountConfig] = field(default_factory=list)
    devices: list[DeviceConfig] = field(default_factory=list)
    default_devices: bool = True
    masked_paths: list[str] = field(default_factory=list)
    readonly_paths: list[str] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    root_propagation: int = linux.MS_PRIVATE | linux.MS_REC
    cgroups_path: str = ""
    seccomp: SeccompConfig | None = None

    def new_namespace(self, flag: int) -> bool:
        return any(f == flag and not path for f, path in self.namespaces)


# --- validation ---------------------------------------------------------------------------------

def _require_abs(path: str, where: str) -> None:
    if not path:
        raise InvalidArgument(f"{where}: empty")
    if not path.startswith("/"):
        raise InvalidArgument(f"{where}: {path!r} not absolute")
    if "\0" in path:
        raise InvalidArgument(f"{where}: contains a NUL byte")


def validate_process(proc: oci_pb2.Process, where: str = "OCI.Process") -> None:
    if not proc.Args:
        raise InvalidArgument(f"{where}.Args: empty")
    if any("\0" in a for a in proc.Args):
        raise InvalidArgument(f"{where}.Args: contains a NUL byte")
    for i, env in enumerate(proc.Env):
        if "=" not in env or env.startswith("=") or "\0" in env:
            raise InvalidArgument(f"{where}.Env[{i}]: {env!r} is not NAME=VALUE")
    if proc.Cwd:
        _require_abs(proc.Cwd, f"{where}.Cwd")
    if proc.HasField("Capabilities"):
        for set_name in CAP_SETS:
            for i, cap in enumerate(getattr(proc.Capabilities, set_name)):
                if cap not in CAP_NUMBERS:
                    raise InvalidArgument(f"{where}.Capabilities.{set_name}[{i}]: unknown capability {cap!r}")
    seen = set()
    for i, rl in enumerate(proc.Rlimits):
        if rl.Type not in RLIMITS:
            raise InvalidArgument(f"{where}.Rlimits[{i}].Type: unknown rlimit {rl.Type!r}")
        if rl.Type in seen:
            raise InvalidArgument(f"{where}.Rlimits[{i}].Type: {rl.Type} given twice")
        seen.add(rl.Type)
        if rl.Soft > rl.Hard:
            raise InvalidArgument(f"{where}.Rlimits[{i}]: soft {rl.Soft} above hard {rl.Hard}")
    if not -1000 <= proc.OOMScoreAdj <= 1000:
        raise InvalidArgument(f"{where}.OOMScoreAdj: {proc.OOMScoreAdj} not in [-1000, 1000]")


def _validate_mount(m: oci_pb2.Mount, where: str) -> None:
    _require_abs(m.destination, f"{where}.destination")
    if ".." in m.destination.split("/"):
        raise InvalidArgument(f"{where}.destination: {m.destination!r} contains '..'")
    for j, opt in enumerate(m.options):
        if opt == "idmap" or opt == "ridmap":
            raise InvalidArgument(f"{where}.options[{j}]: idmapped mounts are not supported")
    bind = m.type == "bind" or any(o in ("bind", "rbind") for o in m.options)
    if bind:
        _require_abs(m.source, f"{where}.source")
    elif not m.type:
        raise InvalidArgument(f"{where}.type: empty (and not a bind mount)")


def _validate_linux(lx: oci_pb2.Linux) -> None:
    types = set()
    for i, ns in enumerate(lx.Namespaces):
        if ns.Type not in NAMESPACES:
            raise InvalidArgument(f"OCI.Linux.Namespaces[{i}].Type: unknown namespace type {ns.Type!r}")
        if ns.Type in types:
            raise InvalidArgument(f"OCI.Linux.Namespaces[{i}].Type: {ns.Type} given twice")
        types.add(ns.Type)
        if ns.Path:
            _require_abs(ns.Path, f"OCI.Linux.Namespaces[{i}].Path")
    if "user" in types or lx.UIDMappings or lx.GIDMappings:
        raise InvalidArgument("OCI.Linux.Namespaces: user namespaces (UIDMappings/GIDMappings) are not supported")
    if lx.RootfsPropagation and lx.RootfsPropagation not in linux.MOUNT_PROPAGATION:
        raise InvalidArgument(f"OCI.Linux.RootfsPropagation: unknown propagation {lx.RootfsPropagation!r}")
    for i, dev in enumerate(lx.Devices):
        _require_abs(dev.Path, f"OCI.Linux.Devices[{i}].Path")
        if ".." in dev.Path.split("/"):
            raise InvalidArgument(f"OCI.Linux.Devices[{i}].Path: {dev.Path!r} contains '..'")
        if dev.Type not in DEVICE_TYPES:
            raise InvalidArgument(f"OCI.Linux.Devices[{i}].Type: {dev.Type!r} is not c, b, u or p")
    for name, paths in (("MaskedPaths", lx.MaskedPaths), ("ReadonlyPaths", lx.ReadonlyPaths)):
        for i, p in enumerate(paths):
            _require_abs(p, f"OCI.Linux.{name}[{i}]")
    for key in lx.Sysctl:
        if not key or "/" in key or ".." in key.split("."):
            raise InvalidArgument(f"OCI.Linux.Sysctl[{key!r}]: not a sysctl name")
    if has_seccomp(lx):
        _validate_seccomp(lx.Seccomp)


def has_seccomp(lx: oci_pb2.Linux) -> bool:
    sc = lx.Seccomp
    return lx.HasField("Seccomp") and bool(sc.DefaultAction or sc.Syscalls or sc.Architectures or sc.Flags)


def _validate_action(action: str, where: str) -> None:
    if action == "SCMP_ACT_NOTIFY":
        raise InvalidArgument(f"{where}: SCMP_ACT_NOTIFY (a seccomp agent) is not supported")
    if action not in seccomp_mod.ACTIONS:
        raise InvalidArgument(f"{where}: unknown seccomp action {action!r}")


def _validate_seccomp(sc: oci_pb2.LinuxSeccomp) -> None:
    where = "OCI.Linux.Seccomp"
    _validate_action(sc.DefaultAction, f"{where}.DefaultAction")
    for i, arch in enumerate(sc.Architectures):
        if arch not in seccomp_mod.ARCHES:
            raise InvalidArgument(f"{where}.Architectures[{i}]: unknown architecture {arch!r}")
    for i, flag in enumerate(sc.Flags):
        if flag not in seccomp_mod.FLAGS:
            raise InvalidArgument(f"{where}.Flags[{i}]: unsupported flag {flag!r}")
    for i, call in enumerate(sc.Syscalls):
        at = f"{where}.Syscalls[{i}]"
        if not call.Names:
            raise InvalidArgument(f"{at}.Names: empty")
        for j, name in enumerate(call.Names):
            if not seccomp_mod.SYSCALL_NAME.match(name):
                raise InvalidArgument(f"{at}.Names[{j}]: {name!r} is not a system call name")
        _validate_action(call.Action, f"{at}.Action")
        if call.errnoret > 0xFFFF:
            raise InvalidArgument(f"{at}.errnoret: {call.errnoret} is above 65535")
        if len(call.Args) > seccomp_mod.MAX_ARGS:
            raise InvalidArgument(f"{at}.Args: more than {seccomp_mod.MAX_ARGS} comparisons")
        for j, arg in enumerate(call.Args):
            if arg.Index >= seccomp_mod.MAX_ARGS:
                raise InvalidArgument(f"{at}.Args[{j}].Index: {arg.Index} is not below {seccomp_mod.MAX_ARGS}")
            if arg.Op not in seccomp_mod.OPERATORS:
                raise InvalidArgument(f"{at}.Args[{j}].Op: unknown operator {arg.Op!r}")


def _validate_hooks(hooks: oci_pb2.Hooks) -> None:
    for name in ("CreateContainer", "StartContainer"):
        if getattr(hooks, name):
            raise InvalidArgument(f"OCI.Hooks.{name}: hooks that run inside the container's namespaces "
                                  "are not supported")
    for name in ("Prestart", "CreateRuntime", "Poststart", "Poststop"):
        for i, hook in enumerate(getattr(hooks, name)):
            _require_abs(hook.Path, f"OCI.Hooks.{name}[{i}].Path")
            if hook.Timeout < 0:
                raise InvalidArgument(f"OCI.Hooks.{name}[{i}].Timeout: {hook.Timeout} is negative")
            for j, env in enumerate(hook.Env):
                if "=" not in env or "\0" in env:
                    raise InvalidArgument(f"OCI.Hooks.{name}[{i}].Env[{j}]: {env!r} is not NAME=VALUE")


def validate(spec: oci_pb2.Spec) -> None:
    """Raise InvalidArgument naming the first field the runtime cannot honour."""
    if not spec.HasField("Process"):
        raise InvalidArgument("OCI.Process: missing")
    validate_process(spec.Process)
    if not spec.HasField("Root") or not spec.Root.Path:
        raise InvalidArgument("OCI.Root.Path: empty")
    _require_abs(spec.Root.Path, "OCI.Root.Path")
    for i, m in enumerate(spec.Mounts):
        _validate_mount(m, f"OCI.Mounts[{i}]")
    if spec.Hostname and (len(spec.Hostname) > 64 or "\0" in spec.Hostname):
        raise InvalidArgument(f"OCI.Hostname: {spec.Hostname!r} is not a valid host name")
    if spec.HasField("Linux"):
        _validate_linux(spec.Linux)
    if spec.HasField("Hooks"):
        _validate_hooks(spec.Hooks)
    if spec.Hostname and not any(ns.Type == "uts" for ns in spec.Linux.Namespaces):
        raise InvalidArgument("OCI.Hostname: set, but the container has no uts namespace")


# --- conversion ---------------------------------------------------------------------------------

def _cap_mask(names) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAP_NUMBERS[name]
    return mask


def convert_process(proc: oci_pb2.Process, string_user: str = "") -> ProcessConfig:
    caps = {}
    if proc.HasField("Capabilities"):
        caps = {s.lower(): _cap_mask(getattr(proc.Capabilities, s)) for s in CAP_SETS}
    user = string_user or proc.User.Username
    return ProcessConfig(
        args=list(proc.Args), env=list(proc.Env), cwd=proc.Cwd or "/",
        uid=proc.User.UID, gid=proc.User.GID, additional_gids=list(proc.User.AdditionalGids),
        user=user, terminal=proc.Terminal,
        console_size=(proc.ConsoleSize.Height, proc.ConsoleSize.Width),
        caps=caps, caps_given=proc.HasField("Capabilities"),
        rlimits=[(RLIMITS[r.Type], _rlim(r.Soft), _rlim(r.Hard)) for r in proc.Rlimits],
        no_new_privileges=proc.NoNewPrivileges,
        oom_score_adj=proc.OOMScoreAdj if proc.OOMScoreAdj else None,
    )


def _rlim(value: int) -> int:
    return resource.RLIM_INFINITY if value >= 2**63 else value


def convert_mount(m: oci_pb2.Mount) -> MountConfig:
    words = linux.parse_mount_options(m.options)
    flags = words.flags | (linux.MS_BIND if m.type == "bind" else 0)
    data = ",".join(w for w in words.data if w not in IGNORED_OPTIONS)
    return MountConfig(destination=posixpath.normpath(m.destination), source=m.source,
                       type=m.type, flags=flags, data=data, propagation=list(words.propagation))


def convert_device(d: oci_pb2.LinuxDevice) -> DeviceConfig:
    perms = d.FileMode & 0o7777 if d.FileMode else 0o666
    return DeviceConfig(path=posixpath.normpath(d.Path), mode=DEVICE_TYPES[d.Type] | perms,
                        major=d.Major, minor=d.Minor, uid=d.UID, gid=d.GID)


def convert(spec: oci_pb2.Spec, container_id: str, string_user: str = "") -> ContainerConfig:
    """The runtime config of a validated spec (call ``validate`` first)."""
    lx = spec.Linux
    mounts = [convert_mount(m) for m in spec.Mounts]
    return ContainerConfig(
        id=container_id,
        rootfs=posixpath.normpath(spec.Root.Path),
        readonly_root=spec.Root.Readonly,
        hostname=spec.Hostname,
        process=convert_process(spec.Process, string_user),
        namespaces=[(NAMESPACES[ns.Type], ns.Path) for ns in lx.Namespaces],
        mounts=mounts,
        devices=[convert_device(d) for d in lx.Devices],
        # runc creates its default /dev nodes unless /dev comes from a bind mount.
        default_devices=not any(m.destination == "/dev" and m.is_bind for m in mounts),
        masked_paths=list(lx.MaskedPaths),
        readonly_paths=list(lx.ReadonlyPaths),
        sysctl=dict(lx.Sysctl),
        root_propagation=linux.MOUNT_PROPAGATION.get(lx.RootfsPropagation,
                                                     linux.MS_PRIVATE | linux.MS_REC),
        cgroups_path=lx.CgroupsPath,
        seccomp=convert_seccomp(lx.Seccomp) if has_seccomp(lx) else None,
    )


def convert_seccomp(sc: oci_pb2.LinuxSeccomp) -> SeccompConfig:
    return SeccompConfig(
        default_action=seccomp_mod.action_code(sc.DefaultAction, 0),
        architectures=[seccomp_mod.ARCHES[a] for a in sc.Architectures],
        flags=[seccomp_mod.FLAGS[f] for f in sc.Flags],
        syscalls=[SyscallRule(names=list(c.Names), action=seccomp_mod.action_code(c.Action, c.errnoret),
                              args=[(a.Index, seccomp_mod.OPERATORS[a.Op], a.Value, a.ValueTwo) for a in c.Args])
                  for c in sc.Syscalls])


def cgroup_resources(spec: oci_pb2.Spec) -> oci_pb2.LinuxResources | None:
    """Linux.Resources plus, as runc does, an "rwm" allow rule for each device of Linux.Devices.

    The rules are added only when the spec has device rules (else nothing is restricted).
    """
    if not spec.Linux.HasField("Resources"):
        return None
    res = spec.Linux.Resources
    if not res.Devices or not spec.Linux.Devices:
        return res
    out = oci_pb2.LinuxResources()
    out.CopyFrom(res)
    for dev in spec.Linux.Devices:
        if dev.Type == "p":
            continue  # a fifo is not a device the cgroup controls
        out.Devices.add(Allow=True, Type="b" if dev.Type == "b" else "c", Major=dev.Major, Minor=dev.Minor,
                        Access="rwm")
    return out


def string_user(user) -> str:
    """A CreateContainer/ExecProcess ``StringUser`` as ``uid[:gid]`` text, or "" when unset."""
    if user is None or not user.uid:
        return ""
    return f"{user.uid}:{user.gid}" if user.gid else user.uid


SIGNALS = {int(s) for s in signal.Signals}
