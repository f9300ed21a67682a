"""Where a shim keeps its things, the container's rootfs mounts, the VM, and their removal.

Everything one shim makes lives under one run directory derived from containerd's address, the
namespace and the task id (``run_dir``): the shared directory with the rootfs mount, the VM's
sockets and logs. ``cleanup(run_dir)`` needs nothing but that path, so ``delete`` after a
``kill -9`` of the shim removes what the shim would have: the processes whose command line names
the run directory (QEMU and virtiofsd, started in sessions of their own), every mount under it,
then the directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent import linux
from kata_agent_client.spec import GUEST_SHARED

log = logging.getLogger(__name__)

SOCKET_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def _digest(address: str, namespace: str, task_id: str) -> str:
    return hashlib.sha256(f"{address}\0{namespace}\0{task_id}".encode()).hexdigest()


def socket_address(address: str, namespace: str, task_id: str) -> str:
    """The shim's ttrpc address: a socket beside containerd's (``s/`` next to it), as containerd's
    own shims do under its state directory; an abstract socket when that path would be too long."""
    digest = _digest(address, namespace, task_id)
    path = Path(address).parent / "s" / digest[:32]
    if len(str(path)) <= SOCKET_MAX:
        return f"unix://{path}"
    return f"kata-py-{digest[:40]}"  # no unix:// prefix: containerd dials it as an abstract socket


def socket_path(addr: str) -> str:
    """The bind/connect path of an address from ``socket_address`` (abstract: leading NUL)."""
    return addr[len("unix://"):] if addr.startswith("unix://") else "\0" + addr


def run_dir(address: str, namespace: str, task_id: str) -> Path:
    """The shim's own directory, beside containerd's socket (a test's containerd keeps it in its
    temporary directory; the machine's keeps it under /run/containerd)."""
    return Path(address).parent / "kata-py" / _digest(address, namespace, task_id)[:16]


# ------------------------------------------------------------------------------------ mounts

def mount_rootfs(mounts, bundle: Path, target: Path) -> None:
    """containerd's rootfs mounts onto ``target`` in order (an overlay snapshot is one); none: the
    bundle's own rootfs directory, bound. Undoes what it mounted when one fails."""
    target.mkdir(parents=True, exist_ok=True)
    done = 0
    try:
        if not mounts:
            linux.mount(str(bundle / "rootfs"), str(target), None, linux.MS_BIND | linux.MS_REC)
            done += 1
            return
        for m in mounts:
            words = linux.parse_mount_options(m.options)
            fstype = None if m.type in ("bind", "rbind") else m.type
            linux.mount(m.source, str(target), fstype, words.flags, ",".join(words.data) or None)
            done += 1
            for flag in words.propagation:
                linux.mount(None, str(target), None, flag)
    except OSError:
        for _ in range(done):
            _umount(str(target))
        raise


def _umount(path: str) -> None:
    try:
        linux.umount2(path, linux.MNT_DETACH)
    except OSError as exc:
        log.warning("umount %s: %s", path, exc)


# ------------------------------------------------------------------------------------ processes

def processes_naming(directory: Path) -> list[int]:
    """Pids of live processes whose command line names ``directory`` (QEMU, virtiofsd)."""
    needle = (str(directory).rstrip("/") + "/").encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd and state != b"Z":
            pids.append(int(entry))
    return pids


def kill_processes(directory: Path, timeout: float = 5.0) -> None:
    pids = processes_naming(directory)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def cleanup(directory: Path, processes: bool = True) -> list[str]:
    """Remove what a shim left under ``directory``: processes (found by a scan of /proc; skipped
    with ``processes=False``, when the caller stopped them itself), mounts, files. Returns what
    could not be removed (empty when all went)."""
    problems = []
    if not directory.exists():
        return problems
    if processes:
        kill_processes(directory)
    for point in linux.mounts_under(directory):
        _umount(point)
    left = linux.mounts_under(directory)
    if left:  # never remove files through a mount still there: they are the container's
        problems.append(f"still mounted: {', '.join(left)}")
        return problems
    shutil.rmtree(directory, ignore_errors=True)
    if directory.exists():
        problems.append(f"{directory} not removed")
    return problems


# ------------------------------------------------------------------------------------ the VM

def guest_settings() -> dict:
    """How the shim's guests are made: q35 (virtio-fs is hot-plugged after a restore), the
    accelerator from KATA_SHIM_ACCEL (auto: KVM when it works)."""
    from qemu.vm import host_arch

    return dict(arch=host_arch(), accel=os.environ.get("KATA_SHIM_ACCEL", "auto"), machine="q35",
                memory=os.environ.get("KATA_SHIM_MEMORY", ""), boot_timeout=150)


def template_dir() -> Path:
    from qemu.template import default_template_dir
    from qemu.vm import host_arch

    override = os.environ.get("KATA_SHIM_TEMPLATE_DIR")
    if override:
        return Path(override)
    base = default_template_dir(host_arch(), "q35")
    return base.with_name("shim-" + base.name)


def ensure_template(settings: dict, directory: Path):
    """The shim's template, made (once, under a lock) when missing or made for another image or
    QEMU. The first task on a machine pays a cold boot and the save."""
    from qemu.template import Template, TemplateError, make_template
    from qemu.vm import Guest

    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tpl = Template(directory)
        try:
            accel = tpl.manifest().get("accel", "")
            tpl.check(Guest(**settings), accel)
            return tpl
        except TemplateError as exc:
            log.info("making the shim's VM template in %s (%s)", directory, exc)
        work = directory.parent / f".{directory.name}.make"
        shutil.rmtree(work, ignore_errors=True)
        try:
            return make_template(Guest(name="shim-template", run_dir=work, **settings), directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)


@dataclass
class Sandbox:
    """One task's VM and rootfs: ``start`` mounts, boots and shares; ``stop`` undoes all of it."""

    task_id: str
    run_dir: Path
    guest: object = None
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def share_dir(self) -> Path:
        return self.run_dir / "shared"

    def rootfs_target(self) -> Path:
        return self.share_dir / self.task_id / "rootfs"

    def guest_root(self) -> str:
        return f"{GUEST_SHARED}/{self.task_id}/rootfs"

    def start(self, rootfs_mounts, bundle: Path) -> None:
        """Mount the rootfs, then start the VM from the template with virtio-fs on the shared
        directory (virtiofsd starts after the mount, so it sees it). Undoes everything on failure."""
        from qemu.vm import Guest

        t0 = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            mount_rootfs(rootfs_mounts, bundle, self.rootfs_target())
            self.phases["rootfs mounted"] = time.monotonic() - t0
            settings = guest_settings()
            tpl = ensure_template(settings, template_dir())
            self.phases["template ready"] = time.monotonic() - t0
            self.guest = Guest(name="task", run_dir=self.run_dir / "vm", share_dir=self.share_dir,
                               template=tpl.dir, virtiofs=True, **settings)
            self.guest.start()
            self.phases["vm ready"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise

    @property
    def addr(self) -> str:
        return self.guest.addr

    @property
    def pid(self) -> int:
        return (self.guest.pid if self.guest is not None else None) or 0

    def stop(self) -> list[str]:
        """Stop the VM and remove everything under the run directory. Processes are looked for
        in /proc only when the VM was not stopped through its own handles (QEMU's and
        virtiofsd's): a failed stop, or no VM object at all."""
        stopped = False
        if self.guest is not None:
            try:
                self.guest.stop()
                stopped = not self.guest.running() and self.guest.virtiofsd_proc is None
            except Exception as exc:  # noqa: BLE001 - the clean-up below still runs
                log.warning("stopping the VM: %s", exc)
        return cleanup(self.run_dir, processes=not stopped)
