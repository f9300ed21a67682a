"""Storage drivers and refcounting against a real agent (private mount namespace)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import grpc
import pytest

from tests.integration.test_resources import LAYOUT, cgparent  # noqa: F401 - a fixture
from tests.integration.test_sandbox import (KATA, agent_path, code_of, mounts, run_sh, snapshot,
                                            spec_json, start_and_wait)

pytestmark = pytest.mark.timeout(120)


def mounted(agent, mount_point: str) -> list[tuple[str, str, str]]:
    return [m for m in mounts(agent) if m[0] == mount_point]


@pytest.fixture
def ext4_image(tmp_path):
    img = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "16M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(_seed(tmp_path)), str(img)], check=True)
    return img


def _seed(tmp_path):
    seed = tmp_path / "seed"
    seed.mkdir()
    (seed / "hello.txt").write_text("from the disk\n")
    return seed


@pytest.fixture
def loop_attach():
    attached: list[str] = []

    def attach(img, device: str | None = None) -> str:
        argv = ["losetup", "--show", device, str(img)] if device else ["losetup", "--find", "--show", str(img)]
        dev = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
        attached.append(dev)
        return dev

    yield attach
    for dev in attached:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_blk_loop_device_present(agent, ext4_image, loop_attach):
    dev = loop_attach(ext4_image)
    mp = f"{KATA}/sandbox/disk"
    agent.client.call("CreateSandbox", {"storages": [
        {"driver": "blk", "source": dev, "fstype": "ext4", "options": ["ro"], "mount_point": mp}]})
    assert mounted(agent, mp) == [(mp, "ext4", dev)]
    assert (agent_path(agent, mp) / "hello.txt").read_text() == "from the disk\n"
    agent.client.call("DestroySandbox", {})
    assert mounted(agent, mp) == []


def test_blk_waits_for_the_uevent(agent, ext4_image, loop_attach):
    free = subprocess.run(["losetup", "--find"], capture_output=True, text=True, check=True).stdout.strip()
    mp = f"{KATA}/sandbox/late"
    result = {}

    def create():
        result["code"] = code_of(agent, "CreateSandbox", {"storages": [
            {"driver": "blk", "source": free, "fstype": "ext4", "mount_point": mp}]})

    caller = threading.Thread(target=create)
    caller.start()
    time.sleep(0.7)
    assert caller.is_alive(), f"did not wait for {free}: {result}"
    loop_attach(ext4_image, free)  # the kernel's change uevent wakes the waiter
    caller.join(10)
    assert result["code"][0] == grpc.StatusCode.OK, result
    assert mounted(agent, mp) == [(mp, "ext4", free)]


def test_blk_timeout_is_deadline_exceeded_naming_the_device(agent_factory):
    agent = agent_factory(["--hotplug-timeout", "0.3"])
    before = snapshot(agent)
    code, msg = code_of(agent, "CreateSandbox", {"storages": [
        {"driver": "blk", "source": "/dev/nosuchdisk", "fstype": "ext4", "mount_point": f"{KATA}/sandbox/x"}]})
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "storages[0].source (/dev/nosuchdisk)" in msg
    assert snapshot(agent) == before


def test_ephemeral_local_bind_overlay(agent, tmp_path):
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "base.txt").write_text("lower\n")
    k = f"{KATA}/sandbox"
    agent.client.call("CreateSandbox", {"storages": [
        {"driver": "ephemeral", "source": "tmpfs", "options": ["size=2m", "nodev"], "mount_point": f"{k}/eph"},
        {"driver": "local", "options": ["mode=0750"], "mount_point": f"{k}/local",
         "fs_group": {"group_id": 2000}},
        {"driver": "bind", "source": str(lower), "options": ["ro"], "mount_point": f"{k}/lower"},
        {"driver": "overlayfs", "source": "overlay", "mount_point": f"{k}/merged",
         "options": [f"lowerdir={k}/lower", f"upperdir={k}/ovl/upper", f"workdir={k}/ovl/work"]},
    ]})
    table = {m[0]: m for m in mounts(agent)}
    assert table[f"{k}/eph"][1] == "tmpfs"
    assert f"{k}/local" not in table
    st = os.stat(agent_path(agent, f"{k}/local"))
    assert (st.st_mode & 0o7777, st.st_gid) == (0o2770, 2000)  # mode, then fs_group: g+rws
    assert table[f"{k}/merged"][1] == "overlay"
    merged = agent_path(agent, f"{k}/merged")
    assert (merged / "base.txt").read_text() == "lower\n"
    (merged / "new.txt").write_text("upper\n")
    assert (agent_path(agent, f"{k}/ovl/upper") / "new.txt").read_text() == "upper\n"
    assert not (lower / "new.txt").exists()
    with pytest.raises(OSError):
        (agent_path(agent, f"{k}/lower") / "x").write_text("read-only")
    agent.client.call("DestroySandbox", {})
    assert not agent_path(agent, f"{k}").exists()
    assert not [m for m in mounts(agent) if m[0].startswith(KATA + "/")]


@pytest.mark.parametrize("storage, field", [
    ({"driver": "overlayfs", "options": ["lowerdir=/etc"], "mount_point": f"{KATA}/o"}, "storages[0].options lowerdir"),
    ({"driver": "bind", "source": "relative", "mount_point": f"{KATA}/b"}, "storages[0].source"),
    ({"driver": "ephemeral", "fstype": "ext4", "mount_point": f"{KATA}/e"}, "storages[0].fstype"),
    ({"driver": "local", "options": ["mode=abc"], "mount_point": f"{KATA}/l"}, "storages[0].options"),
    ({"driver": "blk", "source": "/dev/vda", "mount_point": f"{KATA}/d"}, "storages[0].fstype"),
    ({"driver": "blk", "source": "zz/00", "fstype": "ext4", "mount_point": f"{KATA}/d"}, "storages[0].source"),
])
def test_bad_storage_refused(agent, storage, field):
    before = snapshot(agent)
    code, msg = code_of(agent, "CreateSandbox", {"storages": [storage]})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(field), msg
    assert snapshot(agent) == before


def test_mount_point_through_symlink_refused(agent):
    link = agent_path(agent, f"{KATA}/shared/containers/evil")
    link.symlink_to("/etc")
    before = snapshot(agent)
    code, msg = code_of(agent, "CreateSandbox", {"storages": [
        {"driver": "ephemeral", "mount_point": f"{KATA}/shared/containers/evil/x"}]})
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "symlink" in msg
    assert snapshot(agent) == before
    assert not agent_path(agent, "/etc/x").exists()


def test_refcount_two_containers(agent, busybox_rootfs):
    agent.client.call("CreateSandbox", {"hostname": "rc"})
    mp = f"{KATA}/shared/containers/vol"
    storage = {"driver": "ephemeral", "source": "tmpfs", "mount_point": mp}
    for cid in ("rc-a", "rc-b"):
        agent.client.call("CreateContainer", {"container_id": cid, "storages": [storage],
                                              "OCI": spec_json(busybox_rootfs, ["true"])})
    assert len(mounted(agent, mp)) == 1
    start_and_wait(agent, "rc-a")
    agent.client.call("RemoveContainer", {"container_id": "rc-a"})
    assert len(mounted(agent, mp)) == 1  # rc-b still uses it
    start_and_wait(agent, "rc-b")
    agent.client.call("RemoveContainer", {"container_id": "rc-b"})
    assert mounted(agent, mp) == []
    assert not agent_path(agent, mp).exists()


def test_device_rewritten_to_guest_numbers(agent, busybox_rootfs, ext4_image, loop_attach):
    dev = loop_attach(ext4_image)
    major, minor = (int(x) for x in open(f"/sys/class/block/{os.path.basename(dev)}/dev").read().split(":"))
    agent.client.call("CreateSandbox", {})
    spec = spec_json(busybox_rootfs, ["sh", "-c", "ls -l /dev/xvdb; head -c 1082 /dev/xvdb | tail -c 2 | od -An -tx1"])
    spec["Linux"]["Devices"] = [{"Path": "/dev/xvdb", "Type": "b", "Major": 253, "Minor": 9, "FileMode": 0o660}]
    spec["Linux"].setdefault("Resources", {}).setdefault("Devices", []).append(
        {"Allow": True, "Type": "b", "Major": 253, "Minor": 9, "Access": "r"})
    agent.client.call("CreateContainer", {"container_id": "dev-a", "OCI": spec, "devices": [
        {"type": "blk", "vm_path": dev, "container_path": "/dev/xvdb"}]})
    try:
        status, out = start_and_wait(agent, "dev-a")
    finally:
        agent.client.call("RemoveContainer", {"container_id": "dev-a"})
    assert status == 0, out
    assert re.search(rf"\b{major},\s+{minor}\b", out), out  # the guest's numbers, not 253:9
    assert "53 ef" in out  # the ext4 superblock magic, read through the device cgroup


def test_destroy_sandbox_leaves_a_container_whose_removal_is_to_be_retried(cgparent, agent, busybox_rootfs):
    """A container whose cgroup cannot go (a child cgroup in it) stays registered for another
    RemoveContainer: DestroySandbox refuses and leaves its storage mounted (it used to unmount
    every storage first), and succeeds once the container is removed."""
    agent.client.call("CreateSandbox", {})
    cid, mp = "stuck", f"{KATA}/shared/containers/stuck-vol"
    spec = spec_json(busybox_rootfs, ["true"])
    spec["Linux"]["CgroupsPath"] = cgparent.path(cid)
    agent.client.call("CreateContainer", {"container_id": cid, "OCI": spec, "storages": [
        {"driver": "ephemeral", "source": "tmpfs", "mount_point": mp}]})
    blocker = os.path.join(LAYOUT.roots()[0], cgparent.name, cid, "blocker")
    os.mkdir(blocker)
    try:
        code, msg = code_of(agent, "RemoveContainer", {"container_id": cid})
        assert code == grpc.StatusCode.FAILED_PRECONDITION, msg
        code, msg = code_of(agent, "DestroySandbox", {})
        assert code == grpc.StatusCode.FAILED_PRECONDITION and cid in msg, msg
        assert len(mounted(agent, mp)) == 1
    finally:
        os.rmdir(blocker)
    agent.client.call("RemoveContainer", {"container_id": cid})
    assert mounted(agent, mp) == []
    agent.client.call("DestroySandbox", {})
