"""VM tests: boot the guest image in QEMU once per session and drive the agent over TCP.

Every test here carries the `vm` marker (select with `-m vm`, leave out with `-m "not vm"`).
They skip only when QEMU cannot run at all (no qemu-system binary); a missing image is built
(`bash guest-image/build.sh`, ~20 s with a warm network) unless KATA_VM_BUILD=0.

Environment:
  KATA_VM_ACCEL=auto|kvm|tcg   accelerator (default auto: KVM if it boots, else TCG)
  KATA_VM_STUB=1               boot guest-image's stub health server instead of the agent
  KATA_VM_ARCHES=x86_64,aarch64  which arches the boot tests cover

Fixtures for later suites (containers, storages, hotplug):
  guest         the session's x86_64 Guest (qemu.vm.Guest): .addr, .qmp(), .shell(), .share_dir
  agent_channel a fresh grpc channel to the guest's agent (closed after the test)
  agent_stub    grpc.AgentService stub on that channel
  health_stub   grpc.Health stub on that channel
  guest_for(arch)  boots (once) and returns the guest of another arch
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qemu.vm import Guest, host_arch, image_dir, qemu_binary  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots a QEMU guest (slow)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)


def _ensure_image(arch: str) -> None:
    if (image_dir(arch) / "manifest.json").exists():
        # refresh the small agent layer so the guest runs the agent/ being tested (~1 s), and the
        # base layer too when its inputs changed (modules.txt, requirements.txt, build.sh): an
        # --agent-only refresh would keep a stale base that a fresh clone does not have
        if os.environ.get("KATA_VM_BUILD", "1") != "0":
            _build(arch)
        return
    if os.environ.get("KATA_VM_BUILD", "1") == "0":
        pytest.fail(f"no guest image for {arch} and KATA_VM_BUILD=0: run bash guest-image/build.sh --arch {arch}")
    _build(arch)


def _build(arch: str, *extra: str) -> None:
    r = subprocess.run(["bash", str(ROOT / "guest-image" / "build.sh"), "--arch", arch, *extra],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f"guest-image/build.sh --arch {arch} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def _boot(arch: str, tmp_root: Path) -> Guest:
    if qemu_binary(arch) is None:
        pytest.skip(f"qemu-system-{arch} is not installed: QEMU cannot run here")
    if os.geteuid() != 0 and not os.access("/dev/kvm", os.R_OK) and shutil.which("mmdebstrap") is None:
        pass  # TCG needs no privileges; building the image does (documented in build.sh)
    _ensure_image(arch)
    extra = "agent.stub" if os.environ.get("KATA_VM_STUB") == "1" else ""
    # TCP: the session's tests open several connections at once (a serial channel takes one);
    # tests/vm/test_channel.py covers the serial channel, the default on this host.
    g = Guest(arch=arch, accel=os.environ.get("KATA_VM_ACCEL", "auto"), debug_console=True, channel="tcp",
              cmdline=extra, run_dir=tmp_root / f"vm-{arch}", name=f"test-{arch}", boot_timeout=150)
    g.start()
    return g


@pytest.fixture(scope="session")
def _guests(tmp_path_factory):
    booted: dict[str, Guest] = {}
    root = tmp_path_factory.mktemp("guests")
    yield booted, root
    for g in booted.values():
        g.cleanup()


@pytest.fixture(scope="session")
def guest_for(_guests):
    booted, root = _guests

    def get(arch: str) -> Guest:
        if arch not in booted:
            booted[arch] = _boot(arch, root)
        g = booted[arch]
        if not g.running():
            pytest.fail(f"the {arch} guest is no longer running; console tail:\n{g.console_tail()}")
        return g

    return get


@pytest.fixture(scope="session")
def guest(guest_for) -> Guest:
    return guest_for(host_arch() if host_arch() in ("x86_64", "aarch64") else "x86_64")


@pytest.fixture
def agent_channel(guest):
    import grpc

    ch = grpc.insecure_channel(guest.addr.removeprefix("tcp://"))
    try:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
    finally:
        ch.close()


@pytest.fixture
def health_stub(agent_channel):
    from agent.protocols import health_pb2_grpc

    return health_pb2_grpc.HealthStub(agent_channel)


@pytest.fixture
def agent_stub(agent_channel):
    from agent.protocols import agent_pb2_grpc

    return agent_pb2_grpc.AgentServiceStub(agent_channel)
