"""bench/vm_boot.py's reading of the kernel log and the console (no VM needed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vm_boot():
    spec = importlib.util.spec_from_file_location("vm_boot", ROOT / "bench" / "vm_boot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vm_boot"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("vm_boot", None)


DMESG = """\
[    0.000000] Linux version 6.1.0-57-cloud-amd64
[    0.638379] Trying to unpack rootfs image as initramfs...
[    1.873303] Freeing initrd memory: 103576K
[    3.208821] Run /init as init process
[    6.137691] kata-boot: mark init-start mono=3.798532 pid=1 wall=1796204804.129625
[    6.147457] kata-boot: import agent.init mono=3.835780 s=0.592278 in=-
[    6.159287] kata-boot: mark pid1-setup mono=5.426553 pid=1 s=0.688108
[    6.370922] kata-boot: import agent.runtime.spawner mono=6.190054 s=0.163751 in=-
[    6.380631] kata-boot: mark spawner-started mono=6.363344 pid=1
[   11.724256] kata-boot: sync 0
"""


def test_parse_kmsg(vm_boot):
    kernel, records, syncs = vm_boot.parse_kmsg(DMESG)
    assert kernel == {"initramfs unpack starts": 0.638379, "initramfs unpacked": 1.873303,
                      "kernel runs /init": 3.208821}
    assert [(r["kind"], r["name"]) for r in records] == [
        ("mark", "init-start"), ("import", "agent.init"), ("mark", "pid1-setup"),
        ("import", "agent.runtime.spawner"), ("mark", "spawner-started")]
    assert records[0]["wall"] == "1796204804.129625" and records[1]["in"] == "-"
    assert syncs == [("0", 11.724256)]


def test_clock_lag_is_the_smallest_of_records_written_at_once(vm_boot):
    _, records, _ = vm_boot.parse_kmsg(DMESG)
    # spawner-started was written at once: 6.380631 - 6.363344; the early ones waited for /dev
    assert vm_boot.mono_to_printk(records) == pytest.approx(6.370922 - 6.190054 - 0.163751)


def test_serving_wall_from_the_console(vm_boot):
    console = ('agent-init: pid1 set-up 0.686s\n'
               '{"time": "2026-12-02T09:46:51.824560Z", "level": "info", "msg": "agent serving"}\n')
    assert vm_boot.serving_wall(console) == pytest.approx(1796204811.824560)
    assert vm_boot.serving_wall("nothing here\n") is None


def test_variant_spec(vm_boot):
    v = vm_boot.Variant.parse("trim;cmdline=cryptomgr.notests initcall_blacklist=a,b;image=/x")
    assert (v.name, v.stub, v.cmdline, str(v.image)) == ("trim", False, "cryptomgr.notests initcall_blacklist=a,b", "/x")
    assert vm_boot.Variant.parse("stub").stub
    with pytest.raises(SystemExit):
        vm_boot.Variant.parse("x;bogus=1")
