"""VM templating: boot one guest to "agent ready", keep its memory and device state, and start new
guests from them in a fraction of a cold boot.

    from qemu.template import make_template
    tpl = make_template(Guest(arch="x86_64", debug_console=True), Path("/dev/shm/kata/tpl"))
    with Guest(arch="x86_64", debug_console=True, template=tpl.dir) as g:   # restored
        ...

Making one (``make_template``): the guest boots with its RAM in a file (``memory``, mapped shared,
on tmpfs), answers Health.Check, then QEMU migrates it to ``state`` with the ``x-ignore-shared``
capability: the device state only (~200 KB), the RAM being in the file already. QEMU then quits.

Starting from one (``Guest(template=...)``): QEMU gets the same machine and devices, the RAM file
mapped private (copy-on-write: every guest reads the template's pages and writes its own copies,
the file never changes) and ``-incoming "exec:cat state"``; the guest runs on from where the
template stood. It then needs what it must not share with its siblings: the host sends
ReseedRandomDev (512 fresh bytes; the agent also renews /etc/machine-id) and SetGuestDateTime (its
clock stood still since the template was saved).

What a template cannot carry is added after the restore. vhost-user-fs (virtio-fs) blocks
migration, so templates have none; a guest that wants one is hot-plugged one on a PCIe root port
that the template keeps free (q35 only: microvm's virtio-mmio buses cannot hot-plug). vhost-user
needs RAM that virtiofsd can map too, which a private mapping is not (QEMU 7.2 accepts the device
and the guest then hangs on the mount), so such a guest gets its own shared copy of the template's
RAM (a memfd): slower and without the sharing, but correct.

A template is tied to what it was made from: ``key`` hashes QEMU's version, the kernel and initrd,
and every setting that shapes the machine. A guest whose key differs cannot use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qemu.vm import Guest

MANIFEST = "template.json"
FS_PORT = "kata-fs-port"  # the root port a template's q35 guests keep free for virtio-fs
HOTPLUG_MACHINES = ("q35", "pc")
SEED_BYTES = 512


class TemplateError(RuntimeError):
    pass


def default_template_dir(arch: str, machine: str | None = None) -> Path:
    """Templates live on tmpfs: the RAM file is read by every guest started from it."""
    base = Path(os.environ.get("KATA_TEMPLATE_DIR", "/dev/shm/kata-agent-py/templates"))
    return base / f"{arch}-{machine or 'default'}"


@dataclass
class Template:
    dir: Path

    @property
    def memory(self) -> Path:
        return self.dir / "memory"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists() and self.memory.exists() and self.state.exists()

    def manifest(self) -> dict:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise TemplateError(f"{self.dir}: no usable template ({exc})") from None

    def check(self, guest: "Guest", accel: str) -> None:
        """Raise TemplateError unless ``guest`` can start from this template under ``accel``."""
        if not self.exists():
            raise TemplateError(f"{self.dir}: no template (make one with qemu/boot.py --template)")
        want, have = template_key(guest, accel), self.manifest().get("key")
        if want != have:
            raise TemplateError(f"{self.dir}: the template was made for another guest, image or QEMU "
                                f"(key {have}, this guest {want}); make it again")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@functools.lru_cache
def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
    return out.splitlines()[0] if out else "?"


def template_key(guest: "Guest", accel: str) -> str:
    """What a restore must match: QEMU, the image, and every setting that shapes the machine."""
    from qemu.vm import qemu_binary

    m = guest.manifest()
    shape = {
        "qemu": qemu_version(qemu_binary(guest.arch) or "qemu-system-" + guest.arch),
        "arch": guest.arch, "accel": accel, "machine": guest.machine_type, "cpu": guest.cpu_model(accel),
        "memory": guest.memory_size, "smp": guest.vcpus, "maxcpus": guest.maxcpus,
        "debug_console": guest.debug_console, "cmdline": guest.cmdline, "extra_args": guest.extra_args,
        "channel": guest.agent_channel, "kernel": m["kernel"]["sha256"], "initrd": m["initrd"]["sha256"],
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:20]


def make_template(guest: "Guest", directory: Path, timeout: float = 300.0) -> Template:
    """Boot ``guest`` (not started yet) with its RAM in ``directory``/memory, wait for the agent,
    save the device state next to it and stop the guest. Replaces a template already there."""
    from qemu.vm import BootError

    if guest.proc is not None:
        raise TemplateError("make_template needs a guest that is not started")
    tpl = Template(Path(directory))
    tpl.remove()
    tpl.dir.mkdir(parents=True)
    guest.memory_path = tpl.memory
    guest.virtiofs = False  # vhost-user-fs blocks migration: hot-plugged after each restore
    guest.template = None
    try:
        guest.start()
        # the agent answers Health before it has built everything: saved only once it has
        from qemu.vm import wait_served

        wait_served(guest.addr, timeout)
        accel = guest.used_accel
        t0 = time.monotonic()
        # The source keeps running until QEMU stops it to save the devices: the restored guest
        # then starts running by itself, without a "cont".
        guest.qmp("migrate-set-capabilities",
                  capabilities=[{"capability": "x-ignore-shared", "state": True}])
        guest.qmp("migrate", uri=f"exec:cat > {_quote(tpl.state)}")
        status = _wait_migration(guest, timeout=60)
        if status != "completed":
            raise TemplateError(f"saving the template's device state: migration {status}")
        save_seconds = time.monotonic() - t0
        manifest = {
            "key": template_key(guest, accel), "arch": guest.arch, "accel": accel,
            "machine": guest.machine_type, "memory": guest.memory_size, "smp": guest.vcpus,
            "debug_console": guest.debug_console, "cmdline": guest.cmdline,
            "boot_seconds": round(guest.boot_seconds, 3), "save_seconds": round(save_seconds, 3),
            "state_bytes": tpl.state.stat().st_size,
            "memory_resident_bytes": tpl.memory.stat().st_blocks * 512,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    except (BootError, OSError, TemplateError):
        guest.cleanup()
        tpl.remove()
        raise
    guest.stop()
    guest.cleanup()
    tmp = tpl.manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(tpl.manifest_path)
    return tpl


def _wait_migration(guest: "Guest", timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = guest.qmp("query-migrate").get("status", "")
        if status in ("completed", "failed", "cancelled"):
            return status
        time.sleep(0.01)
    return "timed out"


def _quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))


def incoming_args() -> list[str]:
    """QEMU waits for a migration stream at start-up (given by ``load_state``)."""
    return ["-incoming", "defer"]


def load_state(guest: "Guest", tpl: Template, timeout: float = 30.0) -> None:
    """Feed the template's device state to a QEMU started with ``incoming_args``; RAM stays in the
    file (QEMU 7.2 has no -global for the capability, hence QMP)."""
    deadline = time.monotonic() + timeout
    while not guest.qmp_socket.exists():
        if guest.proc is not None and guest.proc.poll() is not None:
            raise TemplateError("QEMU exited before it could load the template")
        if time.monotonic() > deadline:
            raise TemplateError("QEMU's monitor did not come up")
        time.sleep(0.002)
    guest.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    guest.qmp("migrate-incoming", uri=f"exec:cat {_quote(tpl.state)}")
    status = _wait_migration(guest, timeout=max(1.0, deadline - time.monotonic()))
    if status != "completed":
        raise TemplateError(f"loading the template's device state: migration {status}")


def shared_copy(tpl: Template) -> int:
    """A memfd holding a copy of the template's RAM (only the parts that hold data), for a guest
    whose RAM must be shared with a vhost-user backend. The caller owns the descriptor."""
    fd = os.memfd_create("kata-guest-ram", 0)
    try:
        with open(tpl.memory, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            os.ftruncate(fd, size)
            off = 0
            while off < size:
                try:
                    start = os.lseek(src.fileno(), off, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
                os.lseek(fd, start, os.SEEK_SET)
                pos = start
                while pos < end:
                    n = os.sendfile(fd, src.fileno(), pos, end - pos)
                    if n == 0:
                        break
                    pos += n
                off = end
    except BaseException:
        os.close(fd)
        raise
    return fd


def refresh_identity(addr: str, timeout: float = 1.0) -> bool:
    """What a restored guest must not share with its siblings: fresh entropy (the agent then
    renews its machine-id) and the time of day, on one ttrpc connection. The restore's readiness
    probe too (nothing reaches the guest before it has its own entropy): False while the agent
    cannot be reached, an exception when it refuses."""
    from agent import ttrpc
    from agent.config import parse_address
    from agent.errors import Code
    from agent.protocols import agent_pb2
    from kata_agent_client.dial import dial

    try:
        sock = dial(parse_address(addr), timeout=timeout)
    except OSError:
        return False
    client = ttrpc.Client(sock)
    try:
        seed = agent_pb2.ReseedRandomDevRequest(data=os.urandom(SEED_BYTES)).SerializeToString()
        try:
            client.call("grpc.AgentService", "ReseedRandomDev", seed, timeout=timeout)
        except ttrpc.Status as exc:
            if isinstance(exc, ttrpc.ConnectionClosed) or exc.code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
                return False
            raise TemplateError(f"ReseedRandomDev: {exc}") from None
        now = time.time()
        clock = agent_pb2.SetGuestDateTimeRequest(Sec=int(now), Usec=int(now % 1 * 1e6)).SerializeToString()
        try:
            client.call("grpc.AgentService", "SetGuestDateTime", clock, timeout=10)
        except ttrpc.Status as exc:
            raise TemplateError(f"SetGuestDateTime: {exc}") from None
        return True
    finally:
        client.close()
