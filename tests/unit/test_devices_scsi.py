"""The SCSI disk a storage names by target:lun is found whatever the host number (q35's AHCI
ports take host0-5 before virtio-scsi), on a fake sysfs."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent import devices
from agent.errors import DeadlineExceeded


def _disk(sysfs, host: int, target: int, lun: int, name: str) -> None:
    real = sysfs / f"devices/pci0000:00/0000:00:12.0/virtio2/host{host}/target{host}:0:{target}/" \
                   f"{host}:0:{target}:{lun}/block/{name}"
    real.mkdir(parents=True)
    (real / "dev").write_text("8:0\n")
    (real / "size").write_text("98304\n")
    (sysfs / "class/block").mkdir(parents=True, exist_ok=True)
    os.symlink(real, sysfs / "class/block" / name)
    scan = sysfs / f"class/scsi_host/host{host}"
    scan.mkdir(parents=True, exist_ok=True)
    (scan / "scan").write_text("")


def test_scsi_disk_on_a_host_other_than_0(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "SYSFS", str(tmp_path))
    _disk(tmp_path, 6, 1, 0, "sda")
    node = asyncio.run(devices.wait_block_by_scsi(None, "1:0", 1.0, "storages[0].source"))
    assert (node.name, node.major, node.minor) == ("sda", 8, 0)
    assert (tmp_path / "class/scsi_host/host6/scan").read_text() == "0 1 0"  # the host was asked to scan


def test_another_target_is_not_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "SYSFS", str(tmp_path))
    _disk(tmp_path, 6, 2, 0, "sda")
    with pytest.raises(DeadlineExceeded, match="did not appear"):
        asyncio.run(devices.wait_block_by_scsi(None, "1:0", 0.2, "storages[0].source"))


def test_type_modules_are_loaded_once_before_the_wait(monkeypatch):
    from agent.runtime import command

    calls = []

    async def fake_run(argv, **kw):
        calls.append(argv)
        return command.Completed(argv, 0, b"", b"")

    monkeypatch.setattr(command, "run", fake_run)
    monkeypatch.setattr(devices, "_loaded_for", set())
    for _ in range(2):
        asyncio.run(devices.load_type_modules("scsi"))
        asyncio.run(devices.load_type_modules("nvdimm"))
        asyncio.run(devices.load_type_modules("blk"))
    assert calls == [["modprobe", "-a", "-q", "sd_mod"], ["modprobe", "-a", "-q", "nfit", "nd_pmem"]]
