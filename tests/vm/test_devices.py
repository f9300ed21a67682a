"""Proof on real QEMU devices: in one q35 guest, kernel modules from CreateSandbox, a virtio-scsi
disk as a `scsi` storage, QEMU's NVDIMM as an `nvdimm` storage (dax), PCI hot-plug the guest
kernel does not see by itself, devices[] by PCI path; in a microvm guest, an `mmioblk` disk.

The guest has a conventional pci-bridge at slot 0x11 with ACPI hotplug for bridges turned off;
the cloud kernel has no SHPC driver, so a disk plugged below that bridge stays invisible until
something rescans the PCI bus. Its PCI path is "11/<slot>" (bridge slot / device slot), as Kata's
runtime names it. (VFIO stays untested here: there is no device to pass through.)
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess

import grpc
import pytest

from agent.protocols import agent_pb2
from kata_agent_client.spec import default_config, spec_from_config
from qemu.vm import Guest
from tests.vm import helpers as h

BRIDGE_SLOT = 0x11
LOG_VPORT, CONSOLE_VPORT = 1025, 1026
SCSI_ID = 1
STORAGE = "/run/kata-containers/sandbox/storage"


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """ext4 images holding a busybox rootfs and a file naming the disk."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
    d = tmp_path_factory.mktemp("devdisks")
    h.busybox_rootfs(d)
    out = {}
    for name in ("scsi", "bridged", "device", "pmem"):
        tree = d / f"tree-{name}"
        shutil.copytree(d / "busybox-rootfs", tree / "rootfs", symlinks=True)
        (tree / "rootfs" / "which.txt").write_text(f"the {name} disk\n")
        img = d / f"{name}.img"
        with open(img, "wb") as f:
            f.truncate(PMEM_FS if name == "pmem" else 48 << 20)
        # 4 KiB blocks: DAX needs the page size
        subprocess.run(["mkfs.ext4", "-F", "-q", "-b", "4096", "-d", str(tree), str(img)], check=True)
        out[name] = img
    out["pmem"] = _with_pfn_info(out["pmem"], d / "pmem-dax.img")
    return out


PMEM_DATA_OFFSET = 2 << 20  # the filesystem starts 2 MiB into the NVDIMM
PMEM_FS = 64 << 20


def _fletcher64(data: bytes) -> int:
    lo, hi = 0, 0
    for (word,) in struct.iter_unpack("<I", data):
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFFFFFFFFFF
    return (hi << 32 | lo) & 0xFFFFFFFFFFFFFFFF


def _with_pfn_info(fs_image, dest):
    """The NVDIMM image: a PFN info block (the kernel's nd_pfn_sb, as Kata's image builder writes
    one) at 4 KiB, then the filesystem at 2 MiB; the kernel then makes /dev/pmem0 an fsdax device
    (memmap in RAM) whose data begins at the filesystem."""
    size = PMEM_DATA_OFFSET + PMEM_FS
    sb = bytearray(4096)
    struct.pack_into("<16s16s16sIHHQQI", sb, 0, b"NVDIMM_PFN_INFO\0", bytes(range(1, 17)), bytes(16),
                     0, 1, 4, PMEM_DATA_OFFSET, PMEM_FS // 4096, 1)  # flags, v1.4, dataoff, npfns, PFN_MODE_RAM
    struct.pack_into("<IIIIH", sb, 76, 0, 0, PMEM_DATA_OFFSET, 4096, 64)  # start_pad, end_trunc, align, page sizes
    struct.pack_into("<Q", sb, 4088, _fletcher64(bytes(sb)))
    with open(dest, "wb") as f:
        f.truncate(size)
        f.seek(4096)
        f.write(sb)
        f.seek(PMEM_DATA_OFFSET)
        with open(fs_image, "rb") as src:
            shutil.copyfileobj(src, f)
    return dest


@pytest.fixture(scope="module")
def q35(tmp_path_factory, disks):
    extra = ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
             "-device", f"pci-bridge,id=br1,bus=pcie.0,chassis_nr=1,addr={BRIDGE_SLOT:#x}",
             "-device", "virtio-scsi-pci,id=scsi0,bus=pcie.0,addr=0x12",
             "-drive", f"file={disks['scsi']},if=none,id=sd0,format=raw,readonly=on",
             "-device", f"scsi-hd,drive=sd0,bus=scsi0.0,channel=0,scsi-id={SCSI_ID},lun=0",
             "-machine", "nvdimm=on",
             # private mapping: what the guest writes never reaches the image
             "-object", f"memory-backend-file,id=nv1,share=off,mem-path={disks['pmem']},"
                        f"size={PMEM_DATA_OFFSET + PMEM_FS}",
             "-device", "nvdimm,memdev=nv1,id=nvdimm1"]
    with h.private_guest(tmp_path_factory, "q35dev", machine="q35", smp=1, memory="512M,slots=2,maxmem=2G",
                         extra_args=extra,
                         cmdline=f"agent.hotplug_timeout=5 agent.log_vport={LOG_VPORT} "
                                 f"agent.debug_console_vport={CONSOLE_VPORT}") as g:
        yield g


@pytest.fixture(scope="module")
def stub(q35):
    with h.agent_stub(q35.addr) as s:
        yield s


def plug(g: Guest, image, node: str, slot: int) -> str:
    """A read-only virtio-blk disk below the bridge; returns its PCI path."""
    g.qmp("blockdev-add", **{"node-name": node, "driver": "raw", "read-only": True,
                             "file": {"driver": "file", "filename": str(image), "read-only": True}})
    g.qmp("device_add", driver="virtio-blk-pci", id=f"dev-{node}", drive=node, bus="br1", addr=f"{slot:#x}")
    return f"{BRIDGE_SLOT:02x}/{slot:02x}"


def pci_functions(g: Guest) -> set[str]:
    rc, out = g.shell("ls /sys/bus/pci/devices")
    assert rc == 0, out
    return set(out.split())


def test_kernel_modules_load_with_parameters_and_roll_back(q35, stub):
    """A missing module fails CreateSandbox and unloads what it had loaded; then the module loads
    with its parameter, visible in /sys/module."""
    assert q35.shell("test -e /sys/module/loop")[0] != 0, "loop is loaded already: the test would prove nothing"
    loop = agent_pb2.KernelModule(name="loop", parameters=["max_loop=13"])
    bad = agent_pb2.CreateSandboxRequest(hostname="dev", sandbox_id="dev", kernel_modules=[
        loop, agent_pb2.KernelModule(name="no_such_module_here")])
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateSandbox(bad, timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no_such_module_here" in err.value.details()
    assert q35.shell("test -e /sys/module/loop")[0] != 0, "loop stayed loaded after the failed CreateSandbox"

    stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname="dev", sandbox_id="dev", kernel_modules=[loop]),
                       timeout=60)
    rc, out = q35.shell("cat /sys/module/loop/parameters/max_loop; grep -c '^loop ' /proc/modules")
    assert (rc, out.split()) == (0, ["13", "1"]), out


def test_scsi_storage_on_virtio_scsi(q35, stub):
    storage = agent_pb2.Storage(driver="scsi", source=f"{SCSI_ID}:0", fstype="ext4", options=["ro"],
                                mount_point=f"{STORAGE}/scsi")
    status, out, err = h.run(stub, h.new_id("scsi"), ["cat", "/which.txt"], f"{STORAGE}/scsi/rootfs",
                             storages=[storage])
    assert (status, out) == (0, "the scsi disk\n"), err


def test_nvdimm_storage_mounted_with_dax(q35, stub):
    """QEMU's NVDIMM as an nvdimm storage: the agent loads the NFIT/pmem drivers, waits for
    /dev/pmem0 and mounts it with dax; a container runs from it."""
    storage = agent_pb2.Storage(driver="nvdimm", source="/dev/pmem0", fstype="ext4", options=["ro"],
                                mount_point=f"{STORAGE}/pmem")
    cid = h.new_id("pmem")
    h.create(stub, cid, ["cat", "/which.txt"], f"{STORAGE}/pmem/rootfs", storages=[storage])
    try:
        rc, mounts = q35.shell(f"grep ' {STORAGE}/pmem ' /proc/mounts")
        assert rc == 0 and mounts.strip().startswith("/dev/pmem0 ") and "dax" in mounts, mounts
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        assert h.wait(stub, cid) == 0
        assert h.read_stream(stub, cid) == b"the pmem disk\n"
    finally:
        h.remove(stub, cid)


def test_pci_rescan_finds_a_disk_the_kernel_did_not_see(q35, stub, disks):
    """With the agent's rescan made a no-op (/dev/null over /sys/bus/pci/rescan), CreateContainer
    times out on the disk by PCI path and undoes itself; with the rescan back, it finds the disk."""
    before = pci_functions(q35)
    rc, out = q35.shell("mount --bind /dev/null /sys/bus/pci/rescan")
    assert rc == 0, out
    try:
        pci = plug(q35, disks["bridged"], "bridged", 1)
        assert pci_functions(q35) == before, "the kernel saw the disk by itself: no rescan would be needed"
        storage = agent_pb2.Storage(driver="blk", source=pci, fstype="ext4", options=["ro"],
                                    mount_point=f"{STORAGE}/bridged")
        cid = h.new_id("norescan")
        with pytest.raises(grpc.RpcError) as err:
            h.create(stub, cid, ["cat", "/which.txt"], f"{STORAGE}/bridged/rootfs", storages=[storage])
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
        assert pci_functions(q35) == before
    finally:
        assert q35.shell("umount /sys/bus/pci/rescan")[0] == 0
    assert q35.shell(f"grep -c ' {STORAGE}/bridged ' /proc/mounts")[1].strip() == "0"
    status, out, err = h.run(stub, h.new_id("rescan"), ["cat", "/which.txt"], f"{STORAGE}/bridged/rootfs",
                             storages=[storage])
    assert (status, out) == (0, "the bridged disk\n"), err
    assert len(pci_functions(q35) - before) == 1


def test_device_by_pci_path(q35, stub, disks):
    """devices[] names a disk by PCI path (plugged behind the bridge, found by the agent's rescan);
    the container sees it at its container_path with the guest's numbers: the ext4 magic at 1080."""
    pci = plug(q35, disks["device"], "device", 2)
    cid = h.new_id("dev")
    cfg_devices = [{"path": "/dev/xdisk", "type": "b", "major": 250, "minor": 7, "fileMode": 0o660}]
    rules = [{"allow": False, "access": "rwm"}, {"allow": True, "type": "b", "major": 250, "minor": 7, "access": "r"}]
    root = f"{STORAGE}/scsi-dev"
    storage = agent_pb2.Storage(driver="scsi", source=f"{SCSI_ID}:0", fstype="ext4", options=["ro"],
                                mount_point=root)
    cfg = default_config(["sh", "-c", "dd if=/dev/xdisk bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1"])
    cfg["root"]["path"] = f"{root}/rootfs"
    cfg.pop("hostname")
    cfg["linux"]["devices"] = cfg_devices
    cfg["linux"]["resources"]["devices"] = rules
    req = agent_pb2.CreateContainerRequest(
        container_id=cid, exec_id=cid, OCI=spec_from_config(cfg), storages=[storage],
        devices=[agent_pb2.Device(type="blk", id=pci, container_path="/dev/xdisk")])
    stub.CreateContainer(req, timeout=60)
    try:
        stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
        assert h.wait(stub, cid) == 0
        assert h.read_stream(stub, cid).split() == [b"53", b"ef"]
    finally:
        h.remove(stub, cid)


@pytest.fixture(scope="module")
def microvm(tmp_path_factory, disks):
    """A microvm guest (virtio-mmio only) with a cold-plugged virtio-blk disk (/dev/vda), booted
    with agent.unified_cgroup_hierarchy=0: the cgroup v1 hierarchies, as Kata's default."""
    extra = ["-drive", f"file={disks['bridged']},if=none,id=mm0,format=raw,readonly=on",
             "-device", "virtio-blk-device,drive=mm0"]
    with h.private_guest(tmp_path_factory, "mmioblk", machine="microvm", smp=1, extra_args=extra,
                         cmdline="agent.unified_cgroup_hierarchy=0") as g:
        yield g


MMIO_STORAGE = agent_pb2.Storage(driver="mmioblk", source="/dev/vda", fstype="ext4", options=["ro"],
                                 mount_point=f"{STORAGE}/mmio")


def test_mmioblk_storage_on_microvm(microvm):
    with h.agent_stub(microvm.addr) as stub:
        status, out, err = h.run(stub, h.new_id("mmio"), ["cat", "/which.txt"], f"{STORAGE}/mmio/rootfs",
                                 storages=[MMIO_STORAGE])
    assert (status, out) == (0, "the bridged disk\n"), err
    rc, path = microvm.shell("readlink -f /sys/class/block/vda")
    assert rc == 0 and ("virtio-mmio" in path or "/platform/" in path), path


def test_cgroup_v1_guest_limits_a_container(microvm):
    """agent.unified_cgroup_hierarchy=0: v1 hierarchies at boot, and a container's memory limit
    lands in its own v1 memory cgroup."""
    rc, mounts = microvm.shell("grep cgroup /proc/mounts")
    assert rc == 0 and " /sys/fs/cgroup/memory cgroup " in mounts and "cgroup2" not in mounts, mounts
    cid = h.new_id("v1")
    with h.agent_stub(microvm.addr) as stub:
        h.create(stub, cid, ["sh", "-c", "grep :memory: /proc/self/cgroup; exec sleep 600"],
                 f"{STORAGE}/mmio/rootfs", storages=[MMIO_STORAGE],
                 linux={**default_config()["linux"], "resources": {
                     "devices": [{"allow": False, "access": "rwm"}], "memory": {"limit": 64 << 20}}})
        try:
            stub.StartContainer(agent_pb2.StartContainerRequest(container_id=cid), timeout=30)
            line = h.read_until(stub, cid, b"\n").decode().strip()
            path = line.split(":", 2)[2]
            assert cid in path, line
            rc, limit = microvm.shell(f"cat /sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
            assert (rc, limit.strip()) == (0, str(64 << 20)), limit
        finally:
            h.remove(stub, cid)


VSOCK_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.settimeout(20)
s.connect((1, int(sys.argv[1])))  # the guest's own vsock (vsock_loopback)
if sys.argv[2] == "log":
    buf, lines = b"", []
    while not any(e["msg"] == "agent serving" for e in lines):
        buf += s.recv(65536)
        lines = [json.loads(l) for l in buf.split(b"\\n")[:-1]]  # whole lines only
    print(json.dumps({"levels": sorted({e["level"] for e in lines}),
                      "serving": [e["level"] for e in lines if e["msg"] == "agent serving"]}))
else:
    s.sendall(b"echo vsock-shell-$((6*7)) $(id -u)\\n")
    buf = b""
    while b"vsock-shell-42" not in buf:
        buf += s.recv(65536)
    print(buf.decode(errors="replace").split("vsock-shell-42")[1].split()[0])
"""


def test_log_port_and_debug_console_on_vsock_in_guest(q35):
    """agent.log_vport and agent.debug_console_vport, reached over the guest's own vsock."""
    rc, out = q35.shell(f"modprobe vsock_loopback && cat > /tmp/vsock_client.py <<'EOF'{VSOCK_CLIENT}EOF")
    assert rc == 0, out
    rc, out = q35.shell(f"python3 /tmp/vsock_client.py {LOG_VPORT} log")
    assert rc == 0, out
    got = json.loads(out.strip().splitlines()[-1])
    assert got["serving"] == ["INFO"], got
    assert set(got["levels"]) <= {"TRCE", "DEBG", "INFO", "WARN", "ERRO", "CRIT"}, got
    rc, out = q35.shell(f"python3 /tmp/vsock_client.py {CONSOLE_VPORT} shell")
    assert (rc, out.strip()) == (0, "0"), out  # a root shell


def test_boot_policy_denies_the_debug_console(tmp_path_factory):
    """agent.policy (base64 JSON rules) denying DebugConsole: neither the console shell nor the
    vsock one starts, and the agent serves the rest."""
    import base64

    deny = {"rules": [{"name": "no-shell", "method": "DebugConsole", "action": "deny"}]}
    b64 = base64.b64encode(json.dumps(deny).encode()).decode()
    with h.private_guest(tmp_path_factory, "noshell", machine="microvm", smp=1,
                         cmdline=f"agent.policy={b64} agent.debug_console_vport={CONSOLE_VPORT}") as g:
        with h.agent_stub(g.addr) as stub:
            stub.GetGuestDetails(agent_pb2.GuestDetailsRequest(), timeout=30)
        log = g.console_log.read_text(errors="replace")
        assert "debug console not started: denied by the boot policy (no-shell)" in log, g.console_tail()
        assert "debug console on" not in log, g.console_tail()
