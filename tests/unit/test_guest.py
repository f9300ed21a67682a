"""agent.guest against fake sysfs/proc trees: details, hotplug onlining, checks, volumes."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent import guest
from agent.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from agent.protocols import agent_pb2, csi_pb2


@pytest.fixture
def sysfs(tmp_path):
    mem = tmp_path / guest.MEMORY
    for i, state in enumerate(["1", "0", "0"]):
        (mem / f"memory{i}").mkdir(parents=True)
        (mem / f"memory{i}" / "online").write_text(state + "\n")
    (mem / "block_size_bytes").write_text("8000000\n")
    cpu = tmp_path / guest.CPU
    (cpu / "cpu0").mkdir(parents=True)
    for i, state in [(1, "1"), (2, "0"), (3, "0"), (10, "0")]:
        (cpu / f"cpu{i}").mkdir()
        (cpu / f"cpu{i}" / "online").write_text(state + "\n")
    return tmp_path


def states(root, pattern: str) -> list[str]:
    import glob
    return [open(p).read().strip() for p in sorted(glob.glob(str(root / pattern)), key=lambda p: (len(p), p))]


def test_guest_details(sysfs):
    req = agent_pb2.GuestDetailsRequest(mem_block_size=True, mem_hotplug_probe=True)
    reply = guest.guest_details(req, ["x"], str(sysfs))
    assert reply.mem_block_size_bytes == 0x8000000
    assert reply.support_mem_hotplug_probe is False
    (sysfs / guest.MEMORY / "probe").write_text("")
    assert guest.guest_details(req, [], str(sysfs)).support_mem_hotplug_probe is True
    d = reply.agent_details
    assert d.version == __import__("agent").__version__ and d.init_daemon is (os.getpid() == 1)
    assert list(d.extra_features) == ["x"]
    unasked = guest.guest_details(agent_pb2.GuestDetailsRequest(), [], str(sysfs))
    assert unasked.mem_block_size_bytes == 0 and not unasked.support_mem_hotplug_probe


def test_online_cpus_in_numeric_order_and_memory(sysfs):
    asyncio.run(guest.online_cpu_mem(agent_pb2.OnlineCPUMemRequest(nb_cpus=2), str(sysfs), interval=0))
    assert states(sysfs, f"{guest.CPU}/cpu*/online") == ["1", "1", "1", "0"]  # cpu1, cpu2, cpu3, cpu10
    assert states(sysfs, f"{guest.MEMORY}/memory*/online") == ["1", "1", "1"]


def test_online_cpu_only_leaves_memory(sysfs):
    asyncio.run(guest.online_cpu_mem(agent_pb2.OnlineCPUMemRequest(nb_cpus=1, cpu_only=True), str(sysfs), interval=0))
    assert states(sysfs, f"{guest.MEMORY}/memory*/online") == ["1", "0", "0"]


def test_online_cpus_gives_up_after_the_retry_bound(sysfs):
    with pytest.raises(DeadlineExceeded, match=f"nb_cpus: onlining 5 CPUs: 3 of 5 online after {guest.ONLINE_RETRIES}"):
        asyncio.run(guest.online_cpu_mem(agent_pb2.OnlineCPUMemRequest(nb_cpus=5), str(sysfs), interval=0))


def test_mem_hotplug_by_probe(sysfs):
    with pytest.raises(FailedPrecondition, match="no probe interface"):
        asyncio.run(guest.mem_hotplug_by_probe([0x100000000], str(sysfs)))
    probe = sysfs / guest.MEMORY / "probe"
    probe.write_text("")
    with pytest.raises(InvalidArgument, match=r"memHotplugProbeAddr\[1\]: 0x100000001 is not aligned"):
        asyncio.run(guest.mem_hotplug_by_probe([0x100000000, 0x100000001], str(sysfs)))
    assert probe.read_text() == ""
    asyncio.run(guest.mem_hotplug_by_probe([0x108000000], str(sysfs)))
    assert probe.read_text() == "0x108000000"
    assert states(sysfs, f"{guest.MEMORY}/memory*/online") == ["1", "1", "1"]


@pytest.mark.parametrize("sec, usec, words", [(-1, 0, "Sec: -1"), (1, 1_000_000, "Usec: 1000000"), (1, -5, "Usec")])
def test_datetime_checks(sec, usec, words):
    with pytest.raises(InvalidArgument, match=words):
        guest.check_datetime(sec, usec)


def test_datetime_nanoseconds():
    assert guest.check_datetime(1_700_000_000, 250_000) == 1_700_000_000_250_000_000


def test_seed_checks():
    with pytest.raises(InvalidArgument, match="data: empty"):
        guest.check_seed(b"")
    with pytest.raises(InvalidArgument, match="at most"):
        guest.check_seed(b"x" * (guest.MAX_SEED + 1))
    guest.check_seed(b"x" * 32)


def test_swap_path_checks(tmp_path):
    with pytest.raises(InvalidArgument, match="absolute"):
        guest.check_swap_path("swapfile")
    with pytest.raises(NotFound, match="does not exist"):
        guest.check_swap_path(str(tmp_path / "nope"))
    with pytest.raises(InvalidArgument, match="neither a regular file nor a block device"):
        guest.check_swap_path(str(tmp_path))


def test_add_swap_pci_path_checks():
    with pytest.raises(InvalidArgument, match="PCIPath: empty"):
        asyncio.run(guest.add_swap([], None, 0.1))
    with pytest.raises(InvalidArgument, match="slot outside"):
        asyncio.run(guest.add_swap([2, 40], None, 0.1))


def test_volume_stats(tmp_path):
    reply = guest.volume_stats(str(tmp_path))
    st = os.statvfs(tmp_path)
    by_unit = {u.unit: u for u in reply.usage}
    b = by_unit[csi_pb2.VolumeUsage.BYTES]
    assert b.total == st.f_blocks * st.f_frsize and b.used <= b.total and b.available <= b.total
    assert by_unit[csi_pb2.VolumeUsage.INODES].total == st.f_files
    assert not reply.volume_condition.abnormal
    with pytest.raises(InvalidArgument, match="volume_guest_path"):
        guest.volume_stats("relative/path")
    with pytest.raises(InvalidArgument, match="without '..'"):
        guest.volume_stats(f"{tmp_path}/../x")
    with pytest.raises(NotFound):
        guest.volume_stats(str(tmp_path / "missing"))


def test_mount_at_and_resize_command(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 8:1 / / rw - ext4 /dev/vda1 rw\n"
        "40 22 8:16 / /run/kata-containers/shared/vol\\040a rw shared:1 - ext4 /dev/vdb rw\n"
        "41 22 0:50 / /mnt/x rw - xfs /dev/vdc rw\n"
        "42 22 0:51 / /mnt/t rw - tmpfs tmpfs rw\n")
    m = guest.mount_at("/run/kata-containers/shared/vol a", str(info))
    assert (m.mount_point, m.fstype, m.source) == ("/run/kata-containers/shared/vol a", "ext4", "/dev/vdb")
    assert guest.resize_command(m) == ["resize2fs", "/dev/vdb"]
    assert guest.resize_command(guest.mount_at("/mnt/x", str(info))) == ["xfs_growfs", "/mnt/x"]
    with pytest.raises(FailedPrecondition, match="tmpfs"):
        guest.resize_command(guest.mount_at("/mnt/t", str(info)))
    assert guest.mount_at("/mnt", str(info)) is None


def test_diagnostics_unknown_type():
    with pytest.raises(InvalidArgument, match="log_type: 'nope'; expected one of cgroups, kernel"):
        asyncio.run(guest.diagnostic_data("nope"))
    assert "MemTotal" in asyncio.run(guest.diagnostic_data("meminfo"))
