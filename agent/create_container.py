"""CreateContainer, as one recipe, in the order of Kata's agent (rpc.rs, do_create_container).

    check     the container id; the spec, converted once into the typed config (agent.oci: its
              errors name the field); what the request asks of devices, storages and the sandbox
    devices   wait for each device and point the config at the guest's node (agent.devices)
    storages  mount them, or take another reference (agent.storage)
    namespaces  join the sandbox's pinned UTS and IPC namespaces (and its PID namespace if asked)
    DNS       the sandbox's resolv.conf, unless the spec mounts its own
    hooks     the guest's hooks (CreateSandbox's guest_hook_path) after the spec's
    bundle    /run/kata-containers/<id>: the rootfs bind-mounted at rootfs/, and config.json
    container the runtime creates the container; its init waits for StartContainer
              (agent.runtime.container)

Each step adjusts the typed config and pushes its undo onto one stack; a failure takes back
everything (fault points: agent.undo). The container keeps the stack's actions, run when it is
removed.
"""

from __future__ import annotations

import json
import os

from google.protobuf import json_format

from agent import devices, oci
from agent.errors import AlreadyExists, InvalidArgument, Unimplemented
from agent.oci import CreateConfig
from agent.protocols import agent_pb2
from agent.runtime.container import Container, Runtime
from agent.sandbox import RESOLV_CONF, Sandbox
from agent.storage import Checked, paths
from agent.storage.syscalls import MNT_DETACH, mount_bind, umount
from agent.uevent import UeventListener
from agent.undo import UndoStack, fault_point
from agent.validate import check_id

DNS_MOUNT_OPTIONS = ["bind", "ro", "nosuid", "nodev", "noexec"]


async def create_container(req: agent_pb2.CreateContainerRequest, runtime: Runtime, sandbox: Sandbox,
                           uevents: UeventListener | None, hotplug_timeout: float) -> Container:
    cid = check_id(req.container_id)
    cfg = oci.convert(req.OCI, cid, oci.string_user(req.string_user))
    with runtime.reserve(cid):
        storages = check(req, sandbox)
        async with UndoStack() as undo:
            await devices.prepare(uevents, req.devices, cfg, hotplug_timeout)
            oci.allow_devices(cfg)
            fault_point("devices")
            await sandbox.storages.add_all(storages, undo)
            fault_point("storages")
            join_sandbox_namespaces(cfg, sandbox, req.sandbox_pidns)
            add_dns(cfg, sandbox)
            cfg.hooks.extend(sandbox.guest_hooks())
            fault_point("namespaces")
            write_bundle(cfg, req.OCI, sandbox.kata_root, undo)
            fault_point("bundle")
            container = await runtime.create(cfg)
            container.cleanup = undo.commit()
    return container


def check(req: agent_pb2.CreateContainerRequest, sandbox: Sandbox) -> list[Checked]:
    """Everything of the request beyond the spec, before anything is done; returns the checked
    storages."""
    if len(req.shared_mounts):
        raise Unimplemented("shared_mounts: sharing mounts between containers is not "
                            "implemented by this agent")
    for i, d in enumerate(req.devices):
        devices.check_device(d, f"devices[{i}]")
    storages = sandbox.storages.check(req.storages, "storages")
    sandbox.check_pidns(req.sandbox_pidns)
    if req.sandbox_pidns and any(ns.Type == "user" for ns in req.OCI.Linux.Namespaces):
        raise InvalidArgument("sandbox_pidns: a container with a user namespace cannot mount the /proc "
                              "of the sandbox's PID namespace, which the initial user namespace owns")
    if os.path.lexists(os.path.join(sandbox.kata_root, req.container_id, "config.json")):
        raise AlreadyExists(f"container_id: {req.container_id!r} has a bundle already")
    return storages


def join_sandbox_namespaces(cfg: CreateConfig, sandbox: Sandbox, sandbox_pidns: bool) -> None:
    """The container joins the sandbox's pinned namespaces; it shares the sandbox's host name."""
    wanted = sandbox.pinned_namespaces(sandbox_pidns)
    for kind, path in wanted.items():
        cfg.container.set_namespace(oci.NAMESPACES[kind], path)
    if "uts" in wanted:
        cfg.container.hostname = ""


def add_dns(cfg: CreateConfig, sandbox: Sandbox) -> None:
    """Containers see the sandbox's DNS (as docker does), unless their spec mounts their own."""
    source = sandbox.dns_source()
    if source is None or any(m.destination == RESOLV_CONF for m in cfg.container.mounts):
        return
    cfg.container.mounts.append(oci.mount_config(RESOLV_CONF, source, "bind", DNS_MOUNT_OPTIONS))


def write_bundle(cfg: CreateConfig, spec, kata_root: str, undo: UndoStack) -> None:
    """/run/kata-containers/<id>/rootfs (the spec's root, bind-mounted there) and config.json:
    the spec as the host sent it, with the bundle's rootfs as its root."""
    cid = cfg.container.id
    bundle = os.path.join(kata_root, cid)
    walk = paths.walk_dirs(kata_root, [cid, "rootfs"], mode=0o755)
    walk.close()
    created = walk.created
    undo.push("bundle dirs", lambda: paths.remove_dirs(created))
    rootfs = os.path.join(bundle, "rootfs")
    source = cfg.container.rootfs
    if source != rootfs:
        if not os.path.isdir(source):
            raise InvalidArgument(f"OCI.Root.Path: {spec.Root.Path!r} is not a directory")
        mount_bind(source, rootfs)
        undo.push("rootfs bind", lambda: umount(rootfs, MNT_DETACH))
        cfg.container.rootfs = rootfs
    document = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    document.setdefault("Root", {})["Path"] = rootfs
    config = os.path.join(bundle, "config.json")
    tmp = config + ".tmp"
    # pushed first: a failed write leaves its temporary file
    undo.push("config.json", lambda: (paths.unlink_missing(tmp), paths.unlink_missing(config)))
    with open(tmp, "w") as f:
        f.write(json.dumps(document))  # json's C encoder: json.dump(f, indent=2) took 0.5 ms
    os.rename(tmp, config)

