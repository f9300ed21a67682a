"""OCI runtime config (config.json) <-> grpc.Spec, and a default config like ``runc spec``.

The protocol names OCI fields in CamelCase (``Process.Args``, ``Linux.CgroupsPath``) where the
JSON uses camelCase (``process.args``), with a few renames; the mapping below is by name, so a new
field in the protocol maps without code.
"""

from __future__ import annotations

import copy
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from agent.protocols import oci_pb2

# JSON key -> proto field name, where lowercasing both does not match.
_RENAMES = {"ociVersion": "Version"}
_RENAMES_BACK = {v: k for k, v in _RENAMES.items()}

# The host's shared directory (virtio-fs, QEMU's tag) and where CreateSandbox mounts it in the
# guest; containers' rootfs directories live below it.
GUEST_SHARED = "/run/kata-containers/shared/containers"
SHARE_TAG = "kataShared"


def shared_storage(tag: str = SHARE_TAG):
    """CreateSandbox's storage for the shared directory."""
    from agent.protocols import agent_pb2

    return agent_pb2.Storage(driver="virtio-fs", source=tag, fstype="virtiofs", mount_point=GUEST_SHARED)


DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]
DEFAULT_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]

# What `runc spec` writes (runc 1.1), as data: mounts, masks and namespaces a container expects.
_DEFAULT_CONFIG: dict[str, Any] = {
    "ociVersion": "1.0.2-dev",
    "process": {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": ["sh"],
        "env": DEFAULT_ENV,
        "cwd": "/",
        "capabilities": {k: DEFAULT_CAPS for k in ("bounding", "effective", "permitted", "ambient")},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": True,
    },
    "root": {"path": "rootfs", "readonly": True},
    "hostname": "container",
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ],
    "linux": {
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                        "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                        "/proc/scsi"],
        "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
    },
}


def default_config(args: list[str] | None = None, *, rootfs: str = "rootfs", terminal: bool = False,
                   hostname: str = "container") -> dict[str, Any]:
    """A fresh config.json dict with runc's defaults."""
    cfg = copy.deepcopy(_DEFAULT_CONFIG)
    cfg["process"]["args"] = list(args or ["sh"])
    cfg["process"]["terminal"] = terminal
    cfg["root"]["path"] = rootfs
    cfg["hostname"] = hostname
    return cfg


class SpecError(ValueError):
    """config.json has a key or value the protocol cannot carry; the message names it."""


def _fields_by_key(desc) -> dict[str, FieldDescriptor]:
    return {f.name.lower(): f for f in desc.fields}


def _fill(msg, data: dict[str, Any], where: str) -> None:
    fields = _fields_by_key(msg.DESCRIPTOR)
    for key, value in data.items():
        if value is None:
            continue
        fd = fields.get(_RENAMES.get(key, key).lower())
        if fd is None:
            raise SpecError(f"{where}.{key}: not carried by the Kata protocol")
        path = f"{where}.{key}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            target = getattr(msg, fd.name)
            value_fd = fd.message_type.fields_by_name["value"]
            for k, v in value.items():
                if value_fd.message_type is not None:
                    _fill(target[k], v, f"{path}[{k}]")
                else:
                    target[k] = v
        elif fd.is_repeated:
            target = getattr(msg, fd.name)
            if not isinstance(value, list):
                raise SpecError(f"{path}: expected a list")
            for i, item in enumerate(value):
                if fd.message_type is not None:
                    _fill(target.add(), item, f"{path}[{i}]")
                else:
                    target.append(_scalar(fd, item, f"{path}[{i}]"))
        elif fd.message_type is not None:
            if not isinstance(value, dict):
                raise SpecError(f"{path}: expected an object")
            _fill(getattr(msg, fd.name), value, path)
            getattr(msg, fd.name).SetInParent()
        else:
            setattr(msg, fd.name, _scalar(fd, value, path))


def _scalar(fd: FieldDescriptor, value: Any, where: str) -> Any:
    if fd.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false")
        return value
    if fd.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}: expected an integer")
    return value


def spec_from_config(config: dict[str, Any]) -> oci_pb2.Spec:
    """config.json (as parsed JSON) to grpc.Spec. Unknown keys are refused, not dropped."""
    return message_from_json(oci_pb2.Spec, config, "config")


def message_from_json(cls, data: dict[str, Any], where: str):
    """Any part of config.json (a process, resources) to its grpc message ``cls``."""
    msg = cls()
    try:
        _fill(msg, data, where)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(str(exc)) from exc
    return msg


def _json_key(fd: FieldDescriptor) -> str:
    name = _RENAMES_BACK.get(fd.name, fd.name)
    if name in ("UID", "GID"):
        return name.lower()
    if name.startswith(("UID", "GID")):  # UIDMappings -> uidMappings
        return name[:3].lower() + name[3:]
    if name.startswith("OOM"):
        return "oom" + name[3:]
    return name[:1].lower() + name[1:]


def config_from_spec(msg) -> dict[str, Any]:
    """grpc.Spec (or any part of it) back to config.json form; unset fields are left out."""
    out: dict[str, Any] = {}
    for fd, value in msg.ListFields():
        key = _json_key(fd)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            vfd = fd.message_type.fields_by_name["value"]
            out[key] = {k: (config_from_spec(v) if vfd.message_type else v) for k, v in value.items()}
        elif fd.is_repeated:
            out[key] = [config_from_spec(v) if fd.message_type else v for v in value]
        elif fd.message_type is not None:
            out[key] = config_from_spec(value)
        else:
            out[key] = value
    return out
