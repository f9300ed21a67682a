"""grpc.Spec -> the runtime's typed config, once: pure, no syscalls.

``convert(spec)`` checks each part of the spec as it converts it, as runc's specconv does: what
the runtime cannot honour raises ``InvalidArgument`` naming the field
(``OCI.Mounts[3].destination: not absolute``), and nothing else reads the spec afterwards. It
returns a CreateConfig: the ContainerConfig that the spawner receives as JSON (numbers and flags
computed here, so the forked child only makes syscalls), the cgroup's resources and the hooks.
CreateContainer's later steps adjust that config (agent.create_container).
"""

from __future__ import annotations

import posixpath
import resource
import signal
import stat
from dataclasses import dataclass, field

from agent import hooks as hooks_mod
from agent import linux
from agent.errors import InvalidArgument
from agent.protocols import oci_pb2
from agent.runtime import seccomp as seccomp_mod
from agent.validate import known_once, require_abs

NAMESPACES = {
    "pid": linux.CLONE_NEWPID, "network": linux.CLONE_NEWNET, "mount": linux.CLONE_NEWNS,
    "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS, "user": linux.CLONE_NEWUSER,
    "cgroup": linux.CLONE_NEWCGROUP,
}

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
    # the guest's node to bind where a node cannot be made (a user namespace): "" is ``path``
    # itself, as runc binds it; a hot-plugged device's is the node the guest made (agent.devices)
    source: str = ""


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
    # (container id, host id, size) of a new user namespace; empty without one (or when one is
    # joined by path: then the container's ids are that namespace's own)
    uid_mappings: list[tuple[int, int, int]] = field(default_factory=list)
    gid_mappings: list[tuple[int, int, int]] = field(default_factory=list)

    def host_ids(self, uid: int = 0, gid: int = 0) -> tuple[int, int] | None:
        """The host's ids for container ids ``uid``/``gid`` in a new user namespace (None without
        one, or when one of them is not mapped)."""
        if not self.uid_mappings:
            return None
        host_uid, host_gid = map_id(self.uid_mappings, uid), map_id(self.gid_mappings, gid)
        return None if host_uid is None or host_gid is None else (host_uid, host_gid)

    def check_user(self, proc: ProcessConfig, where: str) -> None:
        """In a new user namespace, the numeric ids of ``proc`` must be mapped (setuid would fail
        with EINVAL inside); a user given by name is resolved in the container, later."""
        if not self.uid_mappings or proc.user:
            return
        if map_id(self.uid_mappings, proc.uid) is None:
            raise InvalidArgument(f"{where}.User.UID: {proc.uid} is not mapped by OCI.Linux.UIDMappings")
        gids = [("GID", proc.gid), *((f"AdditionalGids[{i}]", g) for i, g in enumerate(proc.additional_gids))]
        for name, gid in gids:
            if map_id(self.gid_mappings, gid) is None:
                raise InvalidArgument(f"{where}.User.{name}: {gid} is not mapped by OCI.Linux.GIDMappings")

    def new_namespace(self, flag: int) -> bool:
        return any(f == flag and not path for f, path in self.namespaces)

    def set_namespace(self, flag: int, path: str) -> None:
        """Join the namespace at ``path`` for ``flag`` (replacing the spec's entry, or added)."""
        for i, (f, _) in enumerate(self.namespaces):
            if f == flag:
                self.namespaces[i] = (flag, path)
                return
        self.namespaces.append((flag, path))


@dataclass
class CreateConfig:
    """Everything CreateContainer makes of its spec, converted once."""
    container: ContainerConfig  # what the container's init is set up from (sent to the spawner)
    resources: oci_pb2.LinuxResources | None  # the cgroup's (agent.runtime.cgroups), our own copy
    hooks: hooks_mod.Hooks
    oci_version: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


# --- validation ---------------------------------------------------------------------------------

def _validate_mount(m: oci_pb2.Mount, where: str) -> None:
    require_abs(m.destination, f"{where}.destination")
    if ".." in m.destination.split("/"):
        raise InvalidArgument(f"{where}.destination: {m.destination!r} contains '..'")
    for j, opt in enumerate(m.options):
        if opt == "idmap" or opt == "ridmap":
            raise InvalidArgument(f"{where}.options[{j}]: idmapped mounts are not supported")
    bind = m.type == "bind" or any(o in ("bind", "rbind") for o in m.options)
    if bind:
        require_abs(m.source, f"{where}.source")
    elif not m.type:
        raise InvalidArgument(f"{where}.type: empty (and not a bind mount)")


def _validate_linux(lx: oci_pb2.Linux) -> None:
    known_once([ns.Type for ns in lx.Namespaces], NAMESPACES, "OCI.Linux.Namespaces", "namespace type")
    for i, ns in enumerate(lx.Namespaces):
        if ns.Path:
            require_abs(ns.Path, f"OCI.Linux.Namespaces[{i}].Path")
    _validate_user_ns(lx)
    if lx.RootfsPropagation and lx.RootfsPropagation not in linux.MOUNT_PROPAGATION:
        raise InvalidArgument(f"OCI.Linux.RootfsPropagation: unknown propagation {lx.RootfsPropagation!r}")
    for i, dev in enumerate(lx.Devices):
        require_abs(dev.Path, f"OCI.Linux.Devices[{i}].Path")
        if ".." in dev.Path.split("/"):
            raise InvalidArgument(f"OCI.Linux.Devices[{i}].Path: {dev.Path!r} contains '..'")
        if dev.Type not in DEVICE_TYPES:
            raise InvalidArgument(f"OCI.Linux.Devices[{i}].Type: {dev.Type!r} is not c, b, u or p")
    for name, paths in (("MaskedPaths", lx.MaskedPaths), ("ReadonlyPaths", lx.ReadonlyPaths)):
        for i, p in enumerate(paths):
            require_abs(p, f"OCI.Linux.{name}[{i}]")
    for key in lx.Sysctl:
        if not key or "/" in key or ".." in key.split("."):
            raise InvalidArgument(f"OCI.Linux.Sysctl[{key!r}]: not a sysctl name")
    if has_seccomp(lx):
        _validate_seccomp(lx.Seccomp)


# The kernel takes at most 340 extents per map (Linux 4.15; 5 before), written at once in less
# than a page (user_namespaces(7)).
MAX_EXTENTS = 340
MAP_TEXT_MAX = 4095
ID_LIMIT = 1 << 32


def _validate_user_ns(lx: oci_pb2.Linux) -> None:
    """runc's rules: mappings need a user namespace; a new one needs both maps and the container's
    root (0) mapped in each (runc: "no root user mapping found"); one joined by path may come with
    mappings, which must then be that namespace's own (checked when it is joined)."""
    userns = next((ns for ns in lx.Namespaces if ns.Type == "user"), None)
    if userns is None:
        for name in ("UIDMappings", "GIDMappings"):
            if getattr(lx, name):
                raise InvalidArgument(f"OCI.Linux.{name}: set, but the container has no user namespace "
                                      "(OCI.Linux.Namespaces has no 'user')")
        return
    for name in ("UIDMappings", "GIDMappings"):
        maps = getattr(lx, name)
        if userns.Path and not maps:
            continue
        where = f"OCI.Linux.{name}"
        if not maps:
            raise InvalidArgument(f"{where}: empty, but the container has a new user namespace")
        check_id_mappings([(m.ContainerID, m.HostID, m.Size) for m in maps], where)


def check_id_mappings(maps: list[tuple[int, int, int]], where: str) -> None:
    """What the kernel would refuse in a uid_map/gid_map write, named before anything is done; and
    the container's root must be mapped (it sets the container up)."""
    if len(maps) > MAX_EXTENTS:
        raise InvalidArgument(f"{where}: {len(maps)} extents, the kernel takes at most {MAX_EXTENTS}")
    if len(map_text(maps)) > MAP_TEXT_MAX:
        raise InvalidArgument(f"{where}: the map is longer than the kernel takes in one write "
                              f"({MAP_TEXT_MAX} bytes)")
    for i, (inside, outside, size) in enumerate(maps):
        if size == 0:
            raise InvalidArgument(f"{where}[{i}].Size: 0")
        for field_name, start in (("ContainerID", inside), ("HostID", outside)):
            if start + size > ID_LIMIT:
                raise InvalidArgument(f"{where}[{i}].{field_name}: {start} + size {size} is past 2^32")
    for side, field_name in ((0, "ContainerID"), (1, "HostID")):
        ranges = sorted((m[side], m[side] + m[2], i) for i, m in enumerate(maps))
        for (_, end, _), (start, _, j) in zip(ranges, ranges[1:]):
            if start < end:
                raise InvalidArgument(f"{where}[{j}].{field_name}: overlaps another extent's range")
    if map_id(maps, 0) is None:
        raise InvalidArgument(f"{where}: the container's root (id 0) is not mapped")


def map_text(maps: list[tuple[int, int, int]]) -> str:
    """A map as /proc/<pid>/uid_map takes it."""
    return "".join(f"{inside} {outside} {size}\n" for inside, outside, size in maps)


def map_id(maps: list[tuple[int, int, int]], inside: int) -> int | None:
    """The host id of container id ``inside``, or None when it is not mapped."""
    for start, outside, size in maps:
        if start <= inside < start + size:
            return outside + inside - start
    return None


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


# --- conversion ---------------------------------------------------------------------------------

def _cap_mask(names) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAP_NUMBERS[name]
    return mask


def _check_process(proc: oci_pb2.Process, where: str) -> None:
    if not proc.Args:
        raise InvalidArgument(f"{where}.Args: empty")
    if any("\0" in a for a in proc.Args):
        raise InvalidArgument(f"{where}.Args: contains a NUL byte")
    for i, env in enumerate(proc.Env):
        if "=" not in env or env.startswith("=") or "\0" in env:
            raise InvalidArgument(f"{where}.Env[{i}]: {env!r} is not NAME=VALUE")
    if proc.Cwd:
        require_abs(proc.Cwd, f"{where}.Cwd")
    if proc.HasField("Capabilities"):
        for set_name in CAP_SETS:
            for i, cap in enumerate(getattr(proc.Capabilities, set_name)):
                if cap not in CAP_NUMBERS:
                    raise InvalidArgument(f"{where}.Capabilities.{set_name}[{i}]: unknown capability {cap!r}")
    known_once([rl.Type for rl in proc.Rlimits], RLIMITS, f"{where}.Rlimits", "rlimit")
    for i, rl in enumerate(proc.Rlimits):
        if rl.Soft > rl.Hard:
            raise InvalidArgument(f"{where}.Rlimits[{i}]: soft {rl.Soft} above hard {rl.Hard}")
    if not -1000 <= proc.OOMScoreAdj <= 1000:
        raise InvalidArgument(f"{where}.OOMScoreAdj: {proc.OOMScoreAdj} not in [-1000, 1000]")


def convert_process(proc: oci_pb2.Process, string_user: str = "", where: str = "OCI.Process") -> ProcessConfig:
    """The process of a spec (or of ExecProcess, ``where="process"``), checked."""
    _check_process(proc, where)
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


def mount_config(destination: str, source: str, fstype: str, options) -> MountConfig:
    """A mount from its OCI fields (the spec's, or one the agent adds)."""
    words = linux.parse_mount_options(options)
    flags = words.flags | (linux.MS_BIND if fstype == "bind" else 0)
    data = ",".join(w for w in words.data if w not in IGNORED_OPTIONS)
    return MountConfig(destination=posixpath.normpath(destination), source=source,
                       type=fstype, flags=flags, data=data, propagation=list(words.propagation))


def convert_mount(m: oci_pb2.Mount, where: str = "OCI.Mounts[0]") -> MountConfig:
    _validate_mount(m, where)
    return mount_config(m.destination, m.source, m.type, m.options)


def convert_device(d: oci_pb2.LinuxDevice) -> DeviceConfig:
    perms = d.FileMode & 0o7777 if d.FileMode else 0o666
    return DeviceConfig(path=posixpath.normpath(d.Path), mode=DEVICE_TYPES[d.Type] | perms,
                        major=d.Major, minor=d.Minor, uid=d.UID, gid=d.GID)


def convert(spec: oci_pb2.Spec, container_id: str, string_user: str = "") -> CreateConfig:
    """The typed config of a spec; InvalidArgument names the first field the runtime cannot honour."""
    if not spec.HasField("Process"):
        raise InvalidArgument("OCI.Process: missing")
    process = convert_process(spec.Process, string_user)
    if not spec.HasField("Root") or not spec.Root.Path:
        raise InvalidArgument("OCI.Root.Path: empty")
    require_abs(spec.Root.Path, "OCI.Root.Path")
    mounts = [convert_mount(m, f"OCI.Mounts[{i}]") for i, m in enumerate(spec.Mounts)]
    if spec.Hostname and (len(spec.Hostname) > 64 or "\0" in spec.Hostname):
        raise InvalidArgument(f"OCI.Hostname: {spec.Hostname!r} is not a valid host name")
    lx = spec.Linux
    if spec.HasField("Linux"):
        _validate_linux(lx)
    hooks = hooks_mod.convert(spec.Hooks) if spec.HasField("Hooks") else hooks_mod.Hooks()
    if spec.Hostname and not any(ns.Type == "uts" for ns in lx.Namespaces):
        raise InvalidArgument("OCI.Hostname: set, but the container has no uts namespace")
    container = ContainerConfig(
        id=container_id,
        rootfs=posixpath.normpath(spec.Root.Path),
        readonly_root=spec.Root.Readonly,
        hostname=spec.Hostname,
        process=process,
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
        uid_mappings=[(m.ContainerID, m.HostID, m.Size) for m in lx.UIDMappings],
        gid_mappings=[(m.ContainerID, m.HostID, m.Size) for m in lx.GIDMappings],
    )
    if any(ns.Type == "user" and not ns.Path for ns in lx.Namespaces):
        _devpts_gid(container)
        container.check_user(process, "OCI.Process")
    resources = None
    if lx.HasField("Resources"):
        resources = oci_pb2.LinuxResources()
        resources.CopyFrom(lx.Resources)
    return CreateConfig(container, resources, hooks, spec.Version, dict(spec.Annotations))


def _devpts_gid(cfg: ContainerConfig) -> None:
    """In a new user namespace, a devpts ``gid=`` that the gid map leaves out is dropped (the
    kernel refuses the mount with EINVAL; runc fails there, `runc spec --rootless` removes it):
    the terminals then get the group of the container's root."""
    for m in cfg.mounts:
        if m.type != "devpts":
            continue
        words = m.data.split(",")
        kept = [w for w in words if not (w.startswith("gid=") and w[4:].isdigit()
                                         and map_id(cfg.gid_mappings, int(w[4:])) is None)]
        m.data = ",".join(kept)


def convert_seccomp(sc: oci_pb2.LinuxSeccomp) -> SeccompConfig:
    return SeccompConfig(
        default_action=seccomp_mod.action_code(sc.DefaultAction, 0),
        architectures=[seccomp_mod.ARCHES[a] for a in sc.Architectures],
        flags=[seccomp_mod.FLAGS[f] for f in sc.Flags],
        syscalls=[SyscallRule(names=list(c.Names), action=seccomp_mod.action_code(c.Action, c.errnoret),
                              args=[(a.Index, seccomp_mod.OPERATORS[a.Op], a.Value, a.ValueTwo) for a in c.Args])
                  for c in sc.Syscalls])


def allow_devices(cfg: CreateConfig) -> None:
    """As runc: an "rwm" allow rule in the cgroup for each device of the container, once the
    device numbers are final; only where the spec has device rules (else nothing is restricted)."""
    res = cfg.resources
    if res is None or not res.Devices:
        return
    for dev in cfg.container.devices:
        kind = stat.S_IFMT(dev.mode)
        if kind == stat.S_IFIFO:
            continue  # a fifo is not a device the cgroup controls
        res.Devices.add(Allow=True, Type="b" if kind == stat.S_IFBLK else "c", Major=dev.major,
                        Minor=dev.minor, Access="rwm")


def string_user(user) -> str:
    """A CreateContainer/ExecProcess ``StringUser`` as ``uid[:gid]`` text, or "" when unset."""
    if user is None or not user.uid:
        return ""
    return f"{user.uid}:{user.gid}" if user.gid else user.uid


SIGNALS = {int(s) for s in signal.Signals}
