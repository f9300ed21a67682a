"""Sandbox RPCs: CreateSandbox, DestroySandbox, CopyFile, UpdateEphemeralMounts,
RemoveStaleVirtiofsShareMounts. The work is in agent.sandbox, agent.storage and agent.copyfile."""

from __future__ import annotations

import errno
import logging
import os

from google.protobuf import empty_pb2

from agent.copyfile import copy_file, shared_root_for
from agent.errors import FailedPrecondition, InvalidArgument, NotFound
from agent.rpc import rpc
from agent.storage.syscalls import MNT_DETACH, MS_REMOUNT, mountinfo, parse_options, mount, umount

log = logging.getLogger(__name__)
EMPTY = empty_pb2.Empty


@rpc("CreateSandbox")
async def create_sandbox(agent, request):
    await agent.sandbox.create(request)
    return EMPTY()


@rpc("DestroySandbox")
async def destroy_sandbox(agent, request):
    await agent.runtime.remove_all()
    left = sorted(agent.runtime.containers)
    if left:  # their removal is to be retried (RemoveContainer): their mounts and bundles stay
        raise FailedPrecondition(f"container(s) {', '.join(left)} could not be removed; "
                                 "RemoveContainer them again, then DestroySandbox")
    await agent.sandbox.destroy()
    return EMPTY()


@rpc("CopyFile")
async def copyfile(agent, request):
    copy_file(shared_root_for(agent.config.run_dir), request)
    return EMPTY()


@rpc("UpdateEphemeralMounts")
async def update_ephemeral_mounts(agent, request):
    """Remount ephemeral (tmpfs/hugetlbfs) storages the agent mounted with new options (e.g. size)."""
    manager = agent.sandbox.storages
    plan = []
    for i, s in enumerate(request.storages):
        what = f"storages[{i}]"
        if s.driver != "ephemeral":
            raise InvalidArgument(f"{what}.driver: {s.driver!r}; only ephemeral storages can be updated")
        target = manager.target_of(s, what)
        if target not in manager.mounts:
            raise NotFound(f"{what}.mount_point: {s.mount_point!r} is not a mounted storage")
        plan.append((target, parse_options(list(s.options))))
    for target, opts in plan:
        mount("", target, None, MS_REMOUNT | opts.flags, opts.data)
    return EMPTY()


@rpc("RemoveStaleVirtiofsShareMounts")
async def remove_stale_virtiofs_share_mounts(agent, request):
    """Unmount virtiofs mounts under shared/containers whose backing share is gone (ENOTCONN)."""
    root = shared_root_for(agent.config.run_dir)
    for m in reversed(mountinfo()):
        if m.fstype != "virtiofs" or not m.mount_point.startswith(root + "/"):
            continue
        try:
            os.stat(m.mount_point)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ESTALE, errno.EIO):
                umount(m.mount_point, MNT_DETACH)
                log.info("stale virtiofs mount removed", extra={"fields": {"mount_point": m.mount_point}})
    return EMPTY()
