"""Devices a container asks for: PCI rescan, waiting for the guest's device, config update.

The host names a device by where it plugged it (a PCI path such as ``02/00``, a SCSI ``target:lun``,
a ``/dev/...`` name); the guest kernel picks the node and its major:minor. We wait for the device
(agent.uevent), then point the container's device (agent.oci.DeviceConfig) and the device cgroup
rules that named the host's numbers at the guest's real ones.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import DeadlineExceeded, InvalidArgument
from agent.uevent import Uevent

if TYPE_CHECKING:
    from agent.oci import CreateConfig

log = logging.getLogger(__name__)

SYSFS = "/sys"
DEV = "/dev"
POLL_WITHOUT_UEVENTS = 0.05
DEVICE_TYPES = ("blk", "mmioblk", "scsi", "nvdimm", "vfio-pci", "vfio")
_PCI_SLOT = re.compile(r"[0-9a-fA-F]{2}")
_SCSI_ADDR = re.compile(r"\d+:\d+")


@dataclass(frozen=True)
class Node:
    """A device node the guest kernel made: ``/dev/<name>`` with its numbers."""

    name: str
    major: int
    minor: int
    kind: str = "b"  # "b" or "c"

    @property
    def path(self) -> str:
        return os.path.join(DEV, self.name)


def pci_rescan() -> bool:
    """Ask the kernel to look for hot-plugged PCI devices; False where there is no PCI bus."""
    path = os.path.join(SYSFS, "bus/pci/rescan")
    if not os.path.exists(path):
        return False
    with open(path, "w") as f:
        f.write("1")
    return True


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def block_node(name: str) -> Node | None:
    """``name`` as a block device with a medium (size > 0), or None if it is not there yet."""
    base = os.path.join(SYSFS, "class/block", name)
    try:
        major, minor = _read(os.path.join(base, "dev")).split(":")
        if int(_read(os.path.join(base, "size"))) == 0:
            return None
    except (OSError, ValueError):
        return None
    return Node(name, int(major), int(minor))


def parse_pci_path(text: str, what: str) -> list[str]:
    slots = text.split("/")
    if not text or not all(_PCI_SLOT.fullmatch(s) for s in slots):
        raise InvalidArgument(f"{what}: {text!r} is not a PCI path like '02/00'")
    return [s.lower() for s in slots]


def pci_devpath(slots: list[str]) -> str | None:
    """The sysfs device path (``/devices/pci0000:00/0000:00:02.0/0000:01:00.0``) of a PCI path.

    Bridges on the way must exist; the last device is named from its bus, so it may not exist yet.
    """
    path = "/devices/pci0000:00"
    bus = "0000:00"
    for i, slot in enumerate(slots):
        path = f"{path}/{bus}:{slot}.0"
        if i == len(slots) - 1:
            return path
        buses = sorted(glob.glob(os.path.join(SYSFS + path, "pci_bus", "*")))
        if not buses:
            return None
        bus = os.path.basename(buses[0])
    return path


def _block_below(hit) -> Node | None:
    """The first whole-disk block device whose sysfs path (without /sys) satisfies ``hit``."""
    for entry in sorted(glob.glob(os.path.join(SYSFS, "class/block", "*"))):
        real = os.path.realpath(entry)[len(SYSFS):]
        if os.path.exists(os.path.join(entry, "partition")):
            continue
        if hit(real):
            node = block_node(os.path.basename(entry))
            if node is not None:
                return node
    return None


async def wait(uevents, match, timeout: float, what: str):
    """``match(event_or_None)`` truthy within ``timeout`` or DEADLINE_EXCEEDED naming ``what``."""
    try:
        if uevents is not None:
            return await uevents.wait_for(match, timeout)
        return await _poll(match, timeout)
    except (TimeoutError, asyncio.TimeoutError):
        raise DeadlineExceeded(f"{what}: did not appear within {timeout:g} s") from None


async def _poll(match, timeout: float):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = match(None)
        if found:
            return found
        if loop.time() >= deadline:
            raise TimeoutError
        await asyncio.sleep(POLL_WITHOUT_UEVENTS)


def _is_block(event: Uevent | None) -> bool:
    return event is None or event.subsystem == "block"


async def wait_block_by_name(uevents, dev_path: str, timeout: float, what: str) -> Node:
    """A ``/dev/NAME`` block device (mmioblk, nvdimm, blk given a node path)."""
    if not dev_path.startswith(DEV + "/") or dev_path.count("/") != 2:
        raise InvalidArgument(f"{what}: {dev_path!r} is not a /dev/NAME block device")
    name = os.path.basename(dev_path)

    def match(event: Uevent | None) -> Node | None:
        if event is not None and not (_is_block(event) and event.devname == name):
            return None
        return block_node(name)

    return await wait(uevents, match, timeout, what)


async def wait_block_by_pci(uevents, pci_path: str, timeout: float, what: str) -> Node:
    slots = parse_pci_path(pci_path, what)
    pci_rescan()

    def match(event: Uevent | None) -> Node | None:
        devpath = pci_devpath(slots)
        if devpath is None or not _is_block(event):
            return None
        if event is not None and not event.devpath.startswith(devpath + "/"):
            return None
        return _block_below(lambda real: real.startswith(devpath + "/"))

    return await wait(uevents, match, timeout, what)


def scsi_scan(target: str, lun: str) -> None:
    for scan in glob.glob(os.path.join(SYSFS, "class/scsi_host/host*/scan")):
        with open(scan, "w") as f:
            f.write(f"0 {target} {lun}")


async def wait_block_by_scsi(uevents, addr: str, timeout: float, what: str) -> Node:
    if not _SCSI_ADDR.fullmatch(addr):
        raise InvalidArgument(f"{what}: {addr!r} is not a SCSI address 'target:lun'")
    target, lun = addr.split(":")
    scsi_scan(target, lun)
    # host:channel:target:lun on channel 0 of any host: the guest may have other SCSI hosts
    # first (q35's AHCI ports are host0-5 in the cloud kernel), so the host number is not 0
    here = re.compile(rf"/\d+:0:{target}:{lun}/block/")

    def match(event: Uevent | None) -> Node | None:
        if event is not None and not (_is_block(event) and here.search(event.devpath + "/")):
            return None
        return _block_below(lambda real: here.search(real + "/") is not None)

    return await wait(uevents, match, timeout, what)


async def wait_vfio(uevents, pci_path: str, timeout: float, what: str) -> Node:
    """A VFIO device: the PCI function appears, then its IOMMU group's /dev/vfio/N node."""
    slots = parse_pci_path(pci_path, what)
    pci_rescan()

    def match(event: Uevent | None) -> Node | None:
        devpath = pci_devpath(slots)
        if devpath is None:
            return None
        try:
            group = os.path.basename(os.readlink(os.path.join(SYSFS + devpath, "iommu_group")))
            st = os.stat(os.path.join(DEV, "vfio", group))
        except OSError:
            return None
        return Node(f"vfio/{group}", os.major(st.st_rdev), os.minor(st.st_rdev), "c")

    return await wait(uevents, match, timeout, what)


# Drivers a device type needs that nothing autoloads without udev (Debian's cloud kernel builds
# them as modules; Kata's guest kernel has them built in): loaded once, before the first wait.
TYPE_MODULES = {"scsi": ("sd_mod",), "nvdimm": ("nfit", "nd_pmem")}
_loaded_for: set[str] = set()


async def load_type_modules(dtype: str) -> None:
    """Best effort: a module built in or absent is no error (the wait names a missing device)."""
    modules = TYPE_MODULES.get(dtype)
    if not modules or dtype in _loaded_for:
        return
    from agent.runtime import command

    done = await command.run(["modprobe", "-a", "-q", *modules], timeout=30)
    if done.returncode == 0:
        _loaded_for.add(dtype)
    else:
        log.warning("modprobe %s: %s", " ".join(modules), done.error_text())


async def wait_device(uevents, dtype: str, source: str, timeout: float, what: str) -> Node:
    """Wait for a device of Kata type ``dtype`` named by ``source``."""
    await load_type_modules(dtype)
    if dtype == "blk":
        if source.startswith("/"):
            return await wait_block_by_name(uevents, source, timeout, what)
        return await wait_block_by_pci(uevents, source, timeout, what)
    if dtype in ("mmioblk", "nvdimm"):
        return await wait_block_by_name(uevents, source, timeout, what)
    if dtype == "scsi":
        return await wait_block_by_scsi(uevents, source, timeout, what)
    if dtype in ("vfio-pci", "vfio"):
        return await wait_vfio(uevents, source, timeout, what)
    raise InvalidArgument(f"{what}.type: {dtype!r} is not one of {', '.join(DEVICE_TYPES)}")


_KINDS = {stat.S_IFBLK: "b", stat.S_IFCHR: "c", stat.S_IFIFO: "p"}


def use_node(cfg: CreateConfig, container_path: str, node: Node, what: str) -> None:
    """Point the container's device at ``container_path`` and its cgroup rules at the guest's numbers."""
    path = posixpath.normpath(container_path)
    entry = next((d for d in cfg.container.devices if d.path == path), None)
    if entry is None:
        raise InvalidArgument(f"{what}.container_path: no OCI.Linux.Devices entry has Path {container_path!r}")
    old = (_KINDS.get(stat.S_IFMT(entry.mode), ""), entry.major, entry.minor)
    entry.major, entry.minor, entry.source = node.major, node.minor, node.path
    for rule in cfg.resources.Devices if cfg.resources is not None else ():
        kind_ok = rule.Type in ("", "a", old[0]) or (old[0] in "cu" and rule.Type in "cu")
        if kind_ok and rule.Major == old[1] and rule.Minor == old[2]:
            rule.Major, rule.Minor = node.major, node.minor


def check_device(device, what: str) -> str:
    if device.type not in DEVICE_TYPES:
        raise InvalidArgument(f"{what}.type: {device.type!r} is not one of {', '.join(DEVICE_TYPES)}")
    source = device.vm_path or device.id
    if not source:
        raise InvalidArgument(f"{what}: neither id nor vm_path names the device")
    if not device.container_path.startswith("/"):
        raise InvalidArgument(f"{what}.container_path: {device.container_path!r} is not absolute")
    return source


async def prepare(uevents, devices, cfg: CreateConfig, timeout: float) -> list[Node]:
    """Wait for every device of a CreateContainer request (checked by check_device) and point
    the container's config at it."""
    nodes = []
    for i, device in enumerate(devices):
        source = device.vm_path or device.id
        what = f"devices[{i}] ({device.type} {source})"
        node = await wait_device(uevents, device.type, source, timeout, what)
        use_node(cfg, device.container_path, node, f"devices[{i}]")
        nodes.append(node)
    return nodes
