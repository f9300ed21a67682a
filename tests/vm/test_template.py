"""VM templating: guests started from one saved template are running agents of their own.

microvm: one template, two guests started from it at once; they answer, and differ in what must
not be shared (random bytes, machine-id, the sandbox's hostname) and have the right time, although
the template's clock stood still. q35: a guest started from its template gets virtio-fs hot-plugged
(templates cannot carry it) and runs a container from the shared directory. The cold path is the
rest of tests/vm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from agent.protocols import agent_pb2
from qemu.template import make_template
from qemu.vm import BootError, Guest, qemu_binary
from tests.vm import helpers as h
from tests.vm.conftest import _ensure_image

STALE = 3.0  # seconds between saving the template and starting from it: its clock falls behind


def _make(machine: str | None, extra: list[str] | None = None):
    if qemu_binary("x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed: QEMU cannot run here")
    _ensure_image("x86_64")
    root = Path(tempfile.mkdtemp(prefix="kata-template-test-", dir="/dev/shm"))
    settings = dict(arch="x86_64", accel=os.environ.get("KATA_VM_ACCEL", "auto"), machine=machine,
                    debug_console=True, extra_args=list(extra or []))
    tpl = make_template(Guest(name="tpl", run_dir=root / "make", **settings), root / "template")
    time.sleep(STALE)
    return root, tpl, settings


@pytest.fixture(scope="module")
def microvm_template():
    root, tpl, settings = _make(None)
    yield tpl, settings
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def clones(microvm_template):
    tpl, settings = microvm_template
    guests = []
    try:
        for name in ("a", "b"):
            g = Guest(name=f"clone-{name}", template=tpl.dir, **settings)
            guests.append(g)
            g.start()
        yield guests
    finally:
        for g in guests:
            g.cleanup()


def test_template_holds_state_and_ram(microvm_template):
    tpl, _ = microvm_template
    m = tpl.manifest()
    assert tpl.state.stat().st_size == m["state_bytes"] > 0
    # the RAM file: the template's memory, on tmpfs, far larger than the device state
    assert tpl.memory.stat().st_blocks * 512 > 50 * m["state_bytes"]


def test_restored_guests_answer(clones):
    for g in clones:
        assert g.restored and g.running()
        with h.agent_stub(g.addr) as stub:
            stub.GetGuestDetails(agent_pb2.GuestDetailsRequest(), timeout=30)


def test_restored_guests_differ(clones):
    seen = []
    for g in clones:
        rc, out = g.shell("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /etc/machine-id")
        assert rc == 0, out
        random_hex, machine_id = out.split()[-2:]
        assert len(random_hex) == 64 and len(machine_id) == 32, out
        seen.append((random_hex, machine_id))
    (r1, m1), (r2, m2) = seen
    assert r1 != r2, "two guests from one template drew the same random bytes"
    assert m1 != m2, "two guests from one template share a machine-id"


def test_restored_guests_have_the_time(clones):
    for g in clones:
        rc, out = g.shell("date +%s")
        assert rc == 0, out
        # The template was saved STALE seconds before: without SetGuestDateTime it would lag.
        assert abs(int(out.split()[-1]) - time.time()) < STALE / 2, out


def test_restored_guests_take_their_own_sandbox_hostname(clones):
    names = []
    for i, g in enumerate(clones):
        name = f"clone-{i}-{h.new_id('h')}"
        with h.agent_stub(g.addr) as stub:
            stub.CreateSandbox(agent_pb2.CreateSandboxRequest(hostname=name, sandbox_id=name), timeout=60)
            try:
                rc, out = g.shell("nsenter --uts=/run/sandbox-ns/uts hostname")
            finally:
                stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
        assert rc == 0, out
        names.append(out.split()[-1])
    assert names[0] != names[1] and names[0].startswith("clone-0-") and names[1].startswith("clone-1-")


def test_a_guest_with_other_settings_is_refused(microvm_template):
    tpl, settings = microvm_template
    g = Guest(name="other", template=tpl.dir, **{**settings, "cmdline": "agent.other=1"})
    try:
        with pytest.raises(BootError, match="made for another guest"):
            g.start()
        assert g.proc is None or g.proc.poll() is not None
    finally:
        g.cleanup()


def test_virtio_fs_cannot_be_hot_plugged_on_microvm(microvm_template):
    tpl, settings = microvm_template
    g = Guest(name="fs", template=tpl.dir, virtiofs=True, **settings)
    try:
        with pytest.raises(BootError, match="cannot hot-plug"):
            g.start()
    finally:
        g.cleanup()


@pytest.fixture(scope="module")
def q35_clone(tmp_path_factory):
    root, tpl, settings = _make("q35")
    g = Guest(name="q35-clone", template=tpl.dir, virtiofs=True, **settings)
    try:
        g.start()
        yield g
    finally:
        g.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def test_virtio_fs_hot_plugged_after_restore_runs_a_container(q35_clone, tmp_path):
    g = q35_clone
    assert g.restored and g.virtiofsd_proc is not None
    rootfs = h.busybox_rootfs(tmp_path)
    with h.agent_stub(g.addr) as stub:
        stub.CreateSandbox(agent_pb2.CreateSandboxRequest(
            hostname="q35clone", sandbox_id="q35clone", storages=[h.shared_storage()]), timeout=60)
        try:
            cid = h.new_id()
            status, out, err = h.run(stub, cid, ["sh", "-c", "hostname; echo ok"],
                                     h.place_rootfs(g.share_dir, rootfs, cid))
        finally:
            stub.DestroySandbox(agent_pb2.DestroySandboxRequest(), timeout=60)
    assert status == 0, (out, err)
    assert out.split() == ["q35clone", "ok"], out
