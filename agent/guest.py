"""Guest management: details, CPU and memory hotplug, clock, entropy, swap, volumes, diagnostics.

Everything here acts on the guest kernel through sysfs, ioctls and syscalls. Blocking writes run in
a thread so that the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import glob
import os
import stat
import struct
import time
from collections.abc import Callable

from agent import __version__, devices, identity, linux
from agent.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
                          Unimplemented)
from agent.protocols import agent_pb2, csi_pb2
from agent.runtime import command, seccomp
from agent.storage.drivers import DRIVERS

SYSFS = "/sys"
PROC = "/proc"
MEMORY = "devices/system/memory"
CPU = "devices/system/cpu"
ONLINE_RETRIES = 50
ONLINE_INTERVAL = 0.1
RANDOM_DEV = "/dev/random"
MAX_SEED = 64 << 10
USEC = 1_000_000
RESIZE_TIMEOUT = 300.0
DIAGNOSTIC_LIMIT = 1 << 20


# --- details -------------------------------------------------------------------------------------


def memory_block_size(sysfs: str = SYSFS) -> int:
    """Bytes per memory block (hex in sysfs), or 0 where the kernel has no memory hotplug."""
    try:
        with open(os.path.join(sysfs, MEMORY, "block_size_bytes")) as f:
            return int(f.read().strip(), 16)
    except (OSError, ValueError):
        return 0


def supports_probe(sysfs: str = SYSFS) -> bool:
    return os.path.exists(os.path.join(sysfs, MEMORY, "probe"))


def storage_handlers() -> list[str]:
    return sorted(DRIVERS)


def device_handlers() -> list[str]:
    return sorted(devices.DEVICE_TYPES)


def agent_details(extra_features: list[str]) -> agent_pb2.AgentDetails:
    return agent_pb2.AgentDetails(version=__version__, init_daemon=os.getpid() == 1,
                                  device_handlers=device_handlers(), storage_handlers=storage_handlers(),
                                  supports_seccomp=seccomp.available(), extra_features=extra_features)


def guest_details(request: agent_pb2.GuestDetailsRequest, extra_features: list[str],
                  sysfs: str = SYSFS) -> agent_pb2.GuestDetailsResponse:
    reply = agent_pb2.GuestDetailsResponse(agent_details=agent_details(extra_features))
    if request.mem_block_size:
        reply.mem_block_size_bytes = memory_block_size(sysfs)
    if request.mem_hotplug_probe:
        reply.support_mem_hotplug_probe = supports_probe(sysfs)
    return reply


# --- CPU and memory hotplug ----------------------------------------------------------------------


def _offline(pattern: str) -> list[str]:
    """``online`` files under the glob ``pattern`` that read 0."""
    out = []
    for path in sorted(glob.glob(pattern), key=lambda p: (len(p), p)):
        try:
            with open(path) as f:
                if f.read().strip() == "0":
                    out.append(path)
        except OSError:
            continue
    return out


def _write_online(path: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EAGAIN, errno.EPERM):
            return False  # not ready yet, or a block the kernel cannot online
        raise


def online_cpus(wanted: int, sysfs: str = SYSFS) -> int:
    """Online up to ``wanted`` offline CPUs; returns how many came online."""
    done = 0
    for path in _offline(os.path.join(sysfs, CPU, "cpu[0-9]*", "online")):
        if done >= wanted:
            break
        done += _write_online(path)
    return done


def online_memory(sysfs: str = SYSFS) -> int:
    return sum(_write_online(p) for p in _offline(os.path.join(sysfs, MEMORY, "memory[0-9]*", "online")))


async def _retry(what: str, attempt: Callable[[], int], needed: int, interval: float) -> int:
    """Call ``attempt`` (in a thread) until it has brought ``needed`` items online, at most ONLINE_RETRIES times."""
    total = 0
    for _ in range(ONLINE_RETRIES):
        total += await asyncio.to_thread(attempt)
        if total >= needed:
            return total
        await asyncio.sleep(interval)
    raise DeadlineExceeded(f"{what}: {total} of {needed} online after {ONLINE_RETRIES} attempts")


async def online_cpu_mem(request: agent_pb2.OnlineCPUMemRequest, sysfs: str = SYSFS,
                         interval: float = ONLINE_INTERVAL) -> None:
    if request.nb_cpus:
        left = [request.nb_cpus]

        def attempt() -> int:
            got = online_cpus(left[0], sysfs)
            left[0] -= got
            return got

        await _retry(f"nb_cpus: onlining {request.nb_cpus} CPUs", attempt, request.nb_cpus, interval)
    if not request.cpu_only:
        await asyncio.to_thread(online_memory, sysfs)


async def mem_hotplug_by_probe(addresses: list[int], sysfs: str = SYSFS) -> None:
    """Tell the kernel about hot-added memory at each physical address, then online it."""
    probe = os.path.join(sysfs, MEMORY, "probe")
    if not os.path.exists(probe):
        raise FailedPrecondition(f"memHotplugProbeAddr: {probe} does not exist (no probe interface)")
    block = memory_block_size(sysfs)
    for i, addr in enumerate(addresses):
        if block and addr % block:
            raise InvalidArgument(f"memHotplugProbeAddr[{i}]: {addr:#x} is not aligned to the "
                                  f"memory block size {block:#x}")

    def write_all() -> None:
        for i, addr in enumerate(addresses):
            try:
                with open(probe, "w") as f:
                    f.write(f"{addr:#x}")
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise Internal(f"memHotplugProbeAddr[{i}]: probe {addr:#x}: {exc.strerror}") from None

    await asyncio.to_thread(write_all)
    await asyncio.to_thread(online_memory, sysfs)


# --- clock and entropy ---------------------------------------------------------------------------


def check_datetime(sec: int, usec: int) -> int:
    """Nanoseconds since the epoch for a SetGuestDateTime request."""
    if sec < 0:
        raise InvalidArgument(f"Sec: {sec} is before the epoch")
    if not 0 <= usec < USEC:
        raise InvalidArgument(f"Usec: {usec} must be between 0 and 999999")
    return sec * 1_000_000_000 + usec * 1000


def set_datetime(sec: int, usec: int) -> None:
    ns = check_datetime(sec, usec)
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, ns)
    except PermissionError:
        raise FailedPrecondition("SetGuestDateTime: the agent lacks CAP_SYS_TIME") from None


def check_seed(data: bytes) -> None:
    if not data:
        raise InvalidArgument("data: empty; expected random bytes to mix into the pool")
    if len(data) > MAX_SEED:
        raise InvalidArgument(f"data: {len(data)} bytes, at most {MAX_SEED}")


def reseed(data: bytes, device: str = RANDOM_DEV) -> None:
    """Add ``data`` with full entropy credit to the kernel pool, then reseed the CRNG. As the
    guest's PID 1, also draw a new machine-id (agent.identity)."""
    check_seed(data)
    info = struct.pack("ii", len(data) * 8, len(data)) + data
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, linux.RNDADDENTROPY, info)
        try:
            fcntl.ioctl(fd, linux.RNDRESEEDCRNG)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # kernels before 4.17 have no RNDRESEEDCRNG
                raise
    finally:
        os.close(fd)
    if os.getpid() == 1:  # the guest's own agent: a reseed follows a restore, where siblings share it
        identity.write_machine_id()


# --- swap ----------------------------------------------------------------------------------------

def swapon(path: str, what: str) -> None:
    try:
        linux.swapon(path)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(f"{what}: {path} is already in use as swap") from None
        if exc.errno == errno.EINVAL:
            raise InvalidArgument(f"{what}: {path} has no swap signature (run mkswap on it first)") from None
        raise Internal(f"{what}: swapon {path}: {os.strerror(exc.errno or 0)}") from None


def check_swap_path(path: str) -> str:
    if not path or not os.path.isabs(path) or "\0" in path:
        raise InvalidArgument(f"path: {path!r} must be an absolute path")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"path: {path} does not exist") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise InvalidArgument(f"path: {path} is neither a regular file nor a block device")
    return path


async def add_swap_path(path: str) -> None:
    await asyncio.to_thread(swapon, check_swap_path(path), "path")


async def add_swap(pci_path: list[int], uevents, timeout: float) -> None:
    """swapon the block device the host plugged at ``pci_path`` (slot numbers, root bus first)."""
    if not pci_path:
        raise InvalidArgument("PCIPath: empty")
    if any(not 0 <= slot <= 0x1F for slot in pci_path):
        raise InvalidArgument(f"PCIPath: {pci_path} has a slot outside 0..31")
    text = "/".join(f"{slot:02x}" for slot in pci_path)
    node = await devices.wait_block_by_pci(uevents, text, timeout, f"PCIPath {text}")
    await asyncio.to_thread(swapon, node.path, f"PCIPath {text}")


# --- volumes -------------------------------------------------------------------------------------


def check_volume_path(path: str, field: str = "volume_guest_path") -> str:
    if not path or not os.path.isabs(path) or "\0" in path or ".." in path.split("/"):
        raise InvalidArgument(f"{field}: {path!r} must be an absolute path without '..'")
    if not os.path.exists(path):
        raise NotFound(f"{field}: {path} does not exist")
    return path


def volume_stats(path: str) -> csi_pb2.VolumeStatsResponse:
    st = os.statvfs(check_volume_path(path))
    reply = csi_pb2.VolumeStatsResponse()
    reply.usage.add(unit=csi_pb2.VolumeUsage.BYTES, total=st.f_blocks * st.f_frsize,
                    available=st.f_bavail * st.f_frsize, used=(st.f_blocks - st.f_bfree) * st.f_frsize)
    reply.usage.add(unit=csi_pb2.VolumeUsage.INODES, total=st.f_files, available=st.f_favail,
                    used=st.f_files - st.f_ffree)
    reply.volume_condition.abnormal = False
    reply.volume_condition.message = "ok"
    return reply


def mount_at(path: str, mountinfo: str = f"{PROC}/self/mountinfo") -> linux.MountEntry | None:
    """The topmost mount whose mount point is exactly ``path``."""
    found = None
    for entry in linux.mountinfo(mountinfo):
        if entry.mount_point == path:
            found = entry
    return found


def resize_command(m: linux.MountEntry) -> list[str]:
    if m.fstype in ("ext2", "ext3", "ext4"):
        return ["resize2fs", m.source]
    if m.fstype == "xfs":
        return ["xfs_growfs", m.mount_point]
    if m.fstype == "btrfs":
        return ["btrfs", "filesystem", "resize", "max", m.mount_point]
    raise FailedPrecondition(f"volume_guest_path: {m.mount_point} is {m.fstype}, which cannot be grown "
                             "online (ext2/3/4, xfs, btrfs can)")


async def resize_volume(path: str) -> None:
    """Grow the filesystem mounted at ``path`` to fill its (already resized) block device."""
    path = os.path.normpath(check_volume_path(path))
    m = mount_at(path)
    if m is None:
        raise InvalidArgument(f"volume_guest_path: {path} is not a mount point")
    argv = resize_command(m)
    done = await command.run(argv, timeout=RESIZE_TIMEOUT)
    if done.returncode != 0:
        raise Internal(f"volume_guest_path {path}: {argv[0]}: {done.error_text()}")


# --- diagnostics ---------------------------------------------------------------------------------


def _read_text(path: str, limit: int = DIAGNOSTIC_LIMIT) -> str:
    with open(path, errors="replace") as f:
        return f.read(limit)


def _kernel_log(limit: int = DIAGNOSTIC_LIMIT) -> str:
    """The kernel ring buffer, read from /dev/kmsg without blocking."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    lines, size = [], 0
    try:
        while size < limit:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while reading: go on
                    continue
                raise
            head, _, message = record.partition(";")
            lines.append(message.split("\n", 1)[0])
            size += len(record)
    finally:
        os.close(fd)
    return "\n".join(lines) + "\n"


def _processes() -> str:
    rows = []
    for pid in sorted((p for p in os.listdir(PROC) if p.isdigit()), key=int):
        try:
            cmd = _read_text(f"{PROC}/{pid}/cmdline").replace("\0", " ").strip()
        except OSError:
            continue
        rows.append(f"{pid} {cmd}")
    return "\n".join(rows) + "\n"


DIAGNOSTICS: dict[str, Callable[[], str]] = {
    "kernel": _kernel_log,
    "meminfo": lambda: _read_text(f"{PROC}/meminfo"),
    "mounts": lambda: _read_text(f"{PROC}/self/mountinfo"),
    "processes": _processes,
    "cgroups": lambda: _read_text(f"{PROC}/self/cgroup"),
}


async def diagnostic_data(log_type: str) -> str:
    reader = DIAGNOSTICS.get(log_type)
    if reader is None:
        raise InvalidArgument(f"log_type: {log_type!r}; expected one of {', '.join(sorted(DIAGNOSTICS))}")
    return await asyncio.to_thread(reader)


def memory_agent_unavailable(method: str) -> Unimplemented:
    return Unimplemented(f"{method}: this agent has no memory agent (the memcg aging and compaction "
                         "daemon of Kata's mem-agent); the guest kernel's own reclaim and compaction apply")
