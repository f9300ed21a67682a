"""Hotplug on a q35 guest (PCI): a virtio-blk disk through QMP that the agent waits for and mounts
as a `blk` storage given by PCI path, swap on a hot-plugged disk, a hot-plugged CPU onlined by
OnlineCPUMem, GetVolumeStats on the mounted disk; last, the guest shuts down.

The guest has two PCIe root ports at slots 0x10 and 0x11; a device plugged below one of them has
the PCI path "10/00" (root port slot / device slot on its secondary bus), as Kata's runtime names it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from agent.protocols import agent_pb2, csi_pb2
from qemu.vm import Guest
from tests.vm import helpers as h

PORTS = {"rp1": 0x10, "rp2": 0x11}
DISK_MOUNT = "/run/kata-containers/sandbox/storage/disk1"


@pytest.fixture(scope="module")
def q35(tmp_path_factory):
    extra = []
    for i, (name, slot) in enumerate(PORTS.items(), 1):
        extra += ["-device", f"pcie-root-port,id={name},bus=pcie.0,chassis={i},addr={slot:#x}"]
    with h.private_guest(tmp_path_factory, "q35", machine="q35", smp=1, maxcpus=2, extra_args=extra,
                         cmdline="agent.hotplug_timeout=20") as g:
        yield g


@pytest.fixture(scope="module")
def stub(q35):
    with h.agent_stub(q35.addr) as s:
        yield s


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """disk.img: ext4 holding a busybox rootfs and a marker file; swap.img: a swap signature."""
    for tool in ("mkfs.ext4", "mkswap"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed (apt-get install e2fsprogs util-linux)")
    d = tmp_path_factory.mktemp("disks")
    tree = d / "tree"
    h.busybox_rootfs(d)
    shutil.copytree(d / "busybox-rootfs", tree / "rootfs", symlinks=True)
    (tree / "rootfs" / "hello.txt").write_text("hello from a hot-plugged virtio-blk disk\n")
    disk, swap = d / "disk.img", d / "swap.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-F", "-q", "-L", "kdisk", "-d", str(tree), str(disk)], check=True)
    with open(swap, "wb") as f:
        f.write(b"\0" * (16 << 20))  # no holes: the kernel refuses swap files with holes
    swap.chmod(0o600)
    subprocess.run(["mkswap", str(swap)], check=True, capture_output=True)
    return {"disk": disk, "swap": swap}


def plug_disk(g: Guest, image: Path, node: str, port: str) -> str:
    """blockdev-add + device_add virtio-blk-pci below a root port; returns the PCI path."""
    g.qmp("blockdev-add", **{"node-name": node, "driver": "raw",
                             "file": {"driver": "file", "filename": str(image)}})
    g.qmp("device_add", driver="virtio-blk-pci", id=f"dev-{node}", drive=node, bus=port, addr="0x0")
    return f"{PORTS[port]:02x}/00"


def test_blk_hotplug_storage_for_container(q35, stub, images):
    """CreateContainer names a disk that is not there yet: the agent rescans, waits, mounts it;
    the container runs from it; GetVolumeStats reports the mounted volume."""
    stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="q35", sandbox_id="q35"), timeout=60)
    pci = f"{PORTS['rp1']:02x}/00"
    storage = agent_pb2.Storage(driver="blk", source=pci, fstype="ext4", options=["ro"],
                                mount_point=DISK_MOUNT)
    cid = h.new_id("blk")
    errors: list[BaseException] = []

    def create():
        try:
            h.create(stub, cid, ["sh", "-c", "cat /hello.txt; exec sleep 600"], f"{DISK_MOUNT}/rootfs",
                     storages=[storage])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=create)
    t.start()
    time.sleep(1.0)  # the agent is waiting for the device now
    assert plug_disk(q35, images["disk"], "disk1", "rp1") == pci
    t.join(60)
    assert not errors, errors
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        assert h.read_until(stub, cid, b"\n") == b"hello from a hot-plugged virtio-blk disk\n"
        rc, mounts = q35.shell("cat /proc/mounts")
        assert f" {DISK_MOUNT} ext4 ro" in mounts, mounts

        reply = stub.GetVolumeStats(agent_pb2.VolumeStatsRequest(volume_guest_path=DISK_MOUNT), timeout=10)
        by_unit = {u.unit: u for u in reply.usage}
        b = by_unit[csi_pb2.VolumeUsage.BYTES]
        assert 40 << 20 < b.total <= 64 << 20 and 0 < b.used < b.total, reply
        assert by_unit[csi_pb2.VolumeUsage.INODES].total > 0
        assert not reply.volume_condition.abnormal
    finally:
        h.remove(stub, cid)
    rc, mounts = q35.shell("cat /proc/mounts")
    assert f" {DISK_MOUNT} " not in mounts, "the disk stays mounted after its last container went"


def test_volume_stats_on_guest_path(q35, stub):
    reply = stub.GetVolumeStats(agent_pb2.VolumeStatsRequest(volume_guest_path="/run"), timeout=10)
    assert reply.usage and reply.usage[0].total > 0
    with pytest.raises(grpc.RpcError) as e:
        stub.GetVolumeStats(agent_pb2.VolumeStatsRequest(volume_guest_path="/no/such/dir"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_add_swap_by_pci_path(q35, stub, images):
    pci = plug_disk(q35, images["swap"], "swap1", "rp2")
    stub.AddSwap(agent_pb2.AddSwapRequest(PCIPath=[int(s, 16) for s in pci.split("/")]), timeout=60)
    rc, out = q35.shell("cat /proc/swaps")
    assert rc == 0 and "/dev/vd" in out, out


def test_online_cpu_after_cpu_hotplug(q35, stub):
    cpus = q35.qmp("query-hotpluggable-cpus")
    free = [c for c in cpus if not c.get("qom-path")]
    assert free, f"no free CPU slot, though the q35 guest runs with -smp 1,maxcpus=2: {cpus}"
    slot = free[0]
    q35.qmp("device_add", driver=slot["type"], id="cpu1", **slot["props"])
    deadline = time.monotonic() + 30
    while q35.shell("test -e /sys/devices/system/cpu/cpu1/online")[0] != 0:
        assert time.monotonic() < deadline, "cpu1 did not appear in the guest"
        time.sleep(0.2)
    before = q35.shell("cat /sys/devices/system/cpu/cpu1/online")[1].strip()
    assert before == "0", "the kernel onlined the new CPU by itself: OnlineCPUMem would have nothing to do"
    stub.OnlineCPUMem(agent_pb2.OnlineCPUMemRequest(wait=True, nb_cpus=1, cpu_only=True), timeout=60)
    assert q35.shell("cat /sys/devices/system/cpu/online")[1].strip() == "0-1"


def test_destroy_sandbox_then_shutdown(q35, stub):
    """DestroySandbox, then the agent is told to stop (SIGTERM to PID 1): the guest powers off."""
    stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
    rc, mounts = q35.shell("cat /proc/mounts")
    assert DISK_MOUNT not in mounts
    try:
        q35.shell("kill -TERM 1; sleep 30", timeout=5)
    except (TimeoutError, OSError, RuntimeError):
        pass  # the shell dies with the guest
    assert q35.wait(60) is not None, "QEMU did not exit after the guest powered off"
    assert "power off" in q35.console_log.read_text(errors="replace")
