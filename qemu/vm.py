"""Boot the guest built by guest-image/build.sh in QEMU, and drive it.

    from qemu.vm import Guest
    with Guest(arch="x86_64") as g:      # start(): boots, returns once Health.Check answers
        print(g.addr)                    # "serial:///run/.../agent.sock" on a host without vhost-vsock
        g.qmp("query-status")
    # stop(): QMP quit (after a grace period if the guest is already powering off), then kill

x86_64: accel "auto" tries KVM when /dev/kvm opens and falls back to TCG when the guest does not
come up (on hosts whose /dev/kvm is a paravirtual module a stock kernel dies or crawls there);
machine "microvm" with the uncompressed PVH kernel and a raw cpio boots fastest, "q35" has PCI
(hotplug through QMP). aarch64: "virt" under TCG, -cpu cortex-a72.

The agent's channel (``channel``): vsock where the host has /dev/vhost-vsock, else a virtio-serial
port (``agent.channel.0``) behind a unix socket in the run directory; TCP (port 1024 forwarded to
127.0.0.1:<free port>) only when asked for with ``channel="tcp"``. The guest agent listens only
where the kernel command line says. Networking is QEMU user mode with restrict=on: the guest
reaches nothing. The run directory is 0700 and the sockets QEMU and virtiofsd make in it are 0600.
A host directory is shared over virtio-fs (tag "kataShared") when /usr/lib/qemu/virtiofsd exists.
Every process started here is tracked by pid and killed by pid.

``Guest(template=DIR)`` starts from a template (qemu/template.py: one guest saved at "agent ready")
instead of booting: its device state is loaded and its RAM mapped copy-on-write; the first RPC is
ReseedRandomDev, then SetGuestDateTime. ``phases`` says where that time went.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qemu.template import FS_PORT

REPO = Path(__file__).resolve().parent.parent
IMAGE_ROOT = Path(os.environ.get("KATA_GUEST_OUT", REPO / "guest-image" / "out"))
VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")
AGENT_PORT = 1024
SHARE_TAG = "kataShared"
SERIAL_PORT_NAME = "agent.channel.0"
CHANNELS = ("auto", "vsock", "serial", "tcp")
PRIVATE_UMASK = 0o177  # sockets QEMU and virtiofsd create: 0600


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "kata-agent-py" if base else Path(tempfile.gettempdir()) / "kata-agent-py"


def default_addr_file() -> Path:
    return runtime_dir() / "guest.json"


def host_arch() -> str:
    return os.uname().machine


def image_dir(arch: str) -> Path:
    return IMAGE_ROOT / arch


def qemu_binary(arch: str) -> str | None:
    return shutil.which(f"qemu-system-{arch}")


def kvm_usable(arch: str) -> bool:
    if arch != host_arch():
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def find_virtiofsd() -> str | None:
    for c in VIRTIOFSD_CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("virtiofsd")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_tsc_khz() -> int | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def health_check(addr: str, timeout: float = 2.0, proto: str = "ttrpc") -> bool:
    """One Health.Check on a fresh connection (a reused gRPC channel backs off in 5 s steps).

    ttrpc asks the agent's Kata grpc.Health, as a Kata shim would, and needs no grpcio in the
    guest; gRPC asks grpc.health.v1 (the stub health server has no other)."""
    if proto == "ttrpc":
        return _ttrpc_health(addr, timeout)
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from agent.config import parse_address

    ch = grpc.insecure_channel(parse_address(addr).grpc_target(), options=[("grpc.enable_retries", 0)])
    try:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        ch.close()


def _ttrpc_call(addr: str, service: str, method: str, body: bytes, timeout: float) -> bytes:
    """One ttrpc call on a fresh connection to ``addr``; raises OSError or ttrpc.Status."""
    from agent import ttrpc
    from agent.config import parse_address
    from kata_agent_client.dial import dial

    client = ttrpc.Client(dial(parse_address(addr), timeout=timeout))
    try:
        return client.call(service, method, body, timeout=timeout)
    finally:
        client.close()


def _ttrpc_health(addr: str, timeout: float) -> bool:
    from agent import ttrpc
    from agent.protocols import health_pb2

    try:
        reply = _ttrpc_call(addr, "grpc.Health", "Check", b"", timeout)
    except (ttrpc.Status, OSError):
        return False
    return health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING


def wait_served(addr: str, timeout: float) -> None:
    """Until the agent answers an AgentService call (GetGuestDetails, which changes nothing): it
    answers Health as soon as it listens, imports and builds the rest after, and its AgentService
    calls wait for that (agent.wiring). Any answer of the agent's will do (a boot policy may deny
    the call: it is checked after the wait); a deadline or a closed connection will not. Raises
    BootError when it does not answer in time."""
    from agent import ttrpc
    from agent.errors import Code
    from agent.protocols import agent_pb2

    try:
        _ttrpc_call(addr, "grpc.AgentService", "GetGuestDetails",
                    agent_pb2.GuestDetailsRequest().SerializeToString(), timeout)
    except ttrpc.Status as exc:
        if exc.code == Code.DEADLINE_EXCEEDED or isinstance(exc, ttrpc.ConnectionClosed):
            raise BootError(f"agent at {addr} did not answer GetGuestDetails: {exc}") from None
    except OSError as exc:
        raise BootError(f"agent at {addr} did not answer GetGuestDetails: {exc}") from None


class BootError(RuntimeError):
    pass


@dataclass
class Guest:
    arch: str = field(default_factory=host_arch)
    accel: str = "auto"                 # auto | kvm | tcg
    machine: str | None = None          # x86_64: microvm (default) | q35 | pc; aarch64: virt
    cpu: str | None = None
    memory: str = ""                    # default 512M (x86_64) / 1G (aarch64)
    smp: int = 0                        # default 1 (x86_64) / 2 (aarch64)
    maxcpus: int = 0                    # > smp: room for CPU hotplug (device_add of a CPU)
    image: Path | None = None           # directory with manifest.json
    share_dir: Path | None = None       # host directory shared over virtio-fs
    virtiofs: bool | None = None        # None: whenever virtiofsd exists
    debug_console: bool = False
    channel: str = "auto"               # the agent's: auto (vsock if the host has it, else serial) | vsock | serial | tcp
    netns: str = ""                     # run QEMU in this network namespace (its tap devices live there)
    cmdline: str = ""                   # extra kernel command line
    extra_args: list[str] = field(default_factory=list)  # extra QEMU arguments (e.g. root ports)
    template: Path | None = None        # start from this template (qemu.template) instead of booting
    probe: str = ""                     # readiness probe: ttrpc | grpc (default: grpc for the stub)
    memory_path: Path | None = None     # RAM in this file, mapped shared (how a template is made)
    run_dir: Path | None = None
    addr_file: Path | None = None       # write the address file here (the CLI's well-known one)
    boot_timeout: float = 120.0
    kvm_timeout: float = 20.0           # how long a KVM attempt may take before falling back
    name: str = "guest"
    # filled by start()
    addr: str = ""
    port: int = 0                       # the hostfwd port (channel tcp)
    cid: int = 0                        # the guest's vsock CID (channel vsock)
    used_accel: str = ""
    boot_seconds: float = 0.0
    restored: bool = False              # started from a template ...
    phases: dict[str, float] = field(default_factory=dict)  # ... its steps, seconds since start()
    launched_at: float = 0.0            # time.monotonic() when QEMU was started ...
    ready_at: float = 0.0               # ... and when the agent first answered
    proc: subprocess.Popen | None = field(default=None, repr=False)
    virtiofsd_proc: subprocess.Popen | None = field(default=None, repr=False)
    _own_run_dir: bool = field(default=False, repr=False)
    _shell: socket.socket | None = field(default=None, repr=False)
    _seq: int = field(default=0, repr=False)

    # ------------------------------------------------------------------ paths
    @property
    def image_path(self) -> Path:
        return Path(self.image) if self.image else image_dir(self.arch)

    @property
    def qmp_socket(self) -> Path:
        assert self.run_dir
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        assert self.run_dir
        return self.run_dir / "console.log"

    @property
    def shell_socket(self) -> Path:
        assert self.run_dir
        return self.run_dir / "shell.sock"

    @property
    def virtiofs_socket(self) -> Path:
        assert self.run_dir
        return self.run_dir / "virtiofsd.sock"

    @property
    def agent_socket(self) -> Path:
        """The host end of the agent's virtio-serial channel."""
        assert self.run_dir
        return self.run_dir / "agent.sock"

    @property
    def agent_channel(self) -> str:
        """The channel the agent is reached on: ``channel`` with auto resolved."""
        if self.channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)}, not {self.channel!r}")
        if self.channel != "auto":
            return self.channel
        return "vsock" if os.path.exists("/dev/vhost-vsock") else "serial"

    def _channel_cmdline(self) -> str:
        """Where the agent listens: vsock (its default) and nothing else unless the channel needs it.
        The TCP guest keeps vsock too, for the in-guest vsock tests."""
        channel = self.agent_channel
        if channel == "serial":
            return f"agent.server_addr=serial:///dev/virtio-ports/{SERIAL_PORT_NAME}"
        if channel == "tcp":
            return f"agent.server_addr=tcp://0.0.0.0:{AGENT_PORT},vsock://-1:{AGENT_PORT}"
        return ""

    def _channel_addr(self) -> str:
        channel = self.agent_channel
        if channel == "serial":
            return f"serial://{self.agent_socket}"
        if channel == "tcp":
            return f"tcp://127.0.0.1:{self.port}"
        return f"vsock://{self.cid}:{AGENT_PORT}"

    @property
    def probe_proto(self) -> str:
        """How the readiness probe asks: ttrpc, or gRPC for the stub (it has no ttrpc)."""
        return self.probe or ("grpc" if "agent.stub" in self.cmdline else "ttrpc")

    @property
    def _templated(self) -> bool:
        return self.template is not None or self.memory_path is not None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def manifest(self) -> dict:
        p = self.image_path / "manifest.json"
        if not p.exists():
            raise BootError(f"no guest image at {self.image_path}: run "
                            f"`bash guest-image/build.sh --arch {self.arch}` first")
        return json.loads(p.read_text())

    # ------------------------------------------------------------------ command line
    @property
    def machine_type(self) -> str:
        return self.machine or ("microvm" if self.arch == "x86_64" else "virt")

    @property
    def memory_size(self) -> str:
        return self.memory or ("512M" if self.arch == "x86_64" else "1G")

    @property
    def vcpus(self) -> int:
        return self.smp or (1 if self.arch == "x86_64" else 2)

    def cpu_model(self, accel: str) -> str:
        return self.cpu or ("host" if accel == "kvm" else ("max" if self.arch == "x86_64" else "cortex-a72"))

    def _qemu_argv(self, accel: str, memory_object: str = "", virtiofs: bool = False) -> list[str]:
        """QEMU's command line. ``memory_object``: a memory backend ``-object`` (id "mem") for the
        RAM instead of anonymous memory; ``virtiofs``: a vhost-user-fs device (needs shared RAM)."""
        m = self.manifest()
        qemu = qemu_binary(self.arch)
        if not qemu:
            raise BootError(f"qemu-system-{self.arch} not found")
        kernel = m["kernel"]["path"]
        initrd = m["initrd"]["path"]
        console = m.get("console", "ttyS0")
        memory, smp, machine = self.memory_size, self.vcpus, self.machine_type
        mmio = machine == "microvm"
        dev = (lambda d: f"{d}-device") if mmio else (lambda d: f"{d}-pci")
        # cryptomgr.notests and the KDF's initcall: the kernel's crypto self-tests, 0.1-0.3 s before
        # /init under TCG (the KDF test also waits for the initramfs: it runs modprobe).
        append = [f"console={console}", "reboot=t" if self.arch == "x86_64" else "", "panic=-1",
                  "loglevel=4", "agent.log=info", "cryptomgr.notests", "initcall_blacklist=crypto_kdf108_init",
                  self._channel_cmdline()]
        if self.arch == "x86_64":
            khz = host_tsc_khz()
            if khz and accel == "tcg":
                append += [f"tsc_early_khz={khz}", "tsc=reliable"]
            append += ["random.trust_cpu=on", "i8042.noaux", "i8042.nokbd", "pci=off" if mmio else ""]
        if self.debug_console:
            # shell on hvc0 (virtconsole on a unix socket: Guest.shell()); the kernel keeps ttyS0
            append += ["agent.debug_console", "agent.debug_console_dev=hvc0"]
        if self.cmdline:
            append.append(self.cmdline)
        mach = machine
        if machine == "microvm":
            mach += ",x-option-roms=off,isa-serial=on,rtc=on,pit=off,pic=off,acpi=on"
        if self.arch == "aarch64":
            mach += ",gic-version=3" if self.cpu in ("max",) else ""
        if memory_object:
            mach += ",memory-backend=mem"
        argv = [qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                "-machine", mach, "-accel", accel, "-m", memory,
                "-smp", f"{smp},maxcpus={self.maxcpus}" if self.maxcpus > smp else str(smp),
                "-kernel", kernel, "-initrd", initrd, "-append", " ".join(a for a in append if a),
                "-serial", f"file:{self.console_log}",
                "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
                "-netdev", "user,id=net0,restrict=on" + (
                    f",hostfwd=tcp:127.0.0.1:{self.port}-:{AGENT_PORT}" if self.agent_channel == "tcp" else ""),
                "-device", f"{dev('virtio-net')},netdev=net0",
                "-device", dev("virtio-rng"),
                "-pidfile", str(self.run_dir / "qemu.pid")]
        if mmio:  # virtio-mmio defaults to legacy (v1), which vhost-user (virtiofsd) refuses
            argv += ["-global", "virtio-mmio.force-legacy=false"]
        argv += ["-cpu", self.cpu_model(accel)]
        if memory_object:
            argv += ["-object", memory_object]
        if virtiofs:
            argv += ["-chardev", f"socket,id=vfs,path={self.virtiofs_socket}",
                     "-device", f"{dev('vhost-user-fs')},chardev=vfs,tag={SHARE_TAG},queue-size=1024"]
        serial = self.agent_channel == "serial"
        if self.debug_console or serial:  # one virtio-serial controller; the console port first (hvc0)
            argv += ["-device", dev("virtio-serial")]
        if self.debug_console:
            argv += ["-chardev", f"socket,id=shell,path={self.shell_socket},server=on,wait=off",
                     "-device", "virtconsole,chardev=shell"]
        if serial:
            argv += ["-chardev", f"socket,id=agent,path={self.agent_socket},server=on,wait=off",
                     "-device", f"virtserialport,chardev=agent,name={SERIAL_PORT_NAME}"]
        if self._templated and machine == "q35":  # a free slot for virtio-fs after a restore
            argv += ["-device", f"pcie-root-port,id={FS_PORT},bus=pcie.0,chassis=30,addr=0x1e"]
        argv += list(self.extra_args)
        if self.agent_channel == "vsock":
            argv += ["-device", f"{dev('vhost-vsock')},guest-cid={self.cid}"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    # ------------------------------------------------------------------ lifecycle
    def _start_virtiofsd(self) -> bool:
        binary = find_virtiofsd()
        if not binary:
            return False
        assert self.share_dir
        log = open(self.run_dir / "virtiofsd.log", "wb")
        self.virtiofsd_proc = subprocess.Popen(
            [binary, f"--socket-path={self.virtiofs_socket}", "-o", f"source={self.share_dir}",
             "-o", "cache=auto"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            umask=PRIVATE_UMASK)
        log.close()
        deadline = time.monotonic() + 5
        while not self.virtiofs_socket.exists():
            if self.virtiofsd_proc.poll() is not None or time.monotonic() > deadline:
                self._kill(self.virtiofsd_proc)
                self.virtiofsd_proc = None
                return False
            time.sleep(0.01)
        return True

    def _boot_once(self, accel: str, timeout: float) -> bool:
        """One QEMU start; True once Health.Check answers, False if QEMU died or timed out."""
        self.port = free_port() if self.agent_channel == "tcp" else 0
        if self.agent_channel == "vsock" and not self.cid:
            self.cid = secrets.randbelow(1 << 30) + 3
        self.addr = self._channel_addr()
        for p in (self.qmp_socket, self.console_log, self.virtiofs_socket, self.shell_socket, self.agent_socket):
            p.unlink(missing_ok=True)
        if self.template is not None:
            return self._restore_once(accel, timeout)
        memory = ""
        virtiofs = False
        if self.memory_path is not None:  # a template in the making: its RAM in a file
            Path(self.memory_path).unlink(missing_ok=True)  # nothing left from an earlier attempt
            memory = (f"memory-backend-file,id=mem,size={self.memory_size},"
                      f"mem-path={self.memory_path},share=on")
        elif self.virtiofs is not False and (self.virtiofs or find_virtiofsd()):
            virtiofs = self._start_virtiofsd()
            if virtiofs:  # vhost-user maps the guest's RAM: it must be shared
                memory = f"memory-backend-memfd,id=mem,size={self.memory_size},share=on"
        argv = self._qemu_argv(accel, memory, virtiofs)
        return self._launch(argv, accel, timeout)

    def _launch(self, argv: list[str], accel: str, timeout: float, pass_fds: tuple[int, ...] = (),
                after: Callable[[], None] | None = None, probe: Callable[[str], bool] | None = None) -> bool:
        (self.run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        qlog = open(self.run_dir / "qemu.log", "wb")
        t0 = self.launched_at = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, pass_fds=pass_fds,
                                     stderr=subprocess.STDOUT, start_new_session=True, umask=PRIVATE_UMASK)
        qlog.close()
        if after is not None:
            after()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if (probe or (lambda addr: health_check(addr, timeout=1.0, proto=self.probe_proto)))(self.addr):
                self.ready_at = time.monotonic()
                self.boot_seconds = self.ready_at - t0
                self.used_accel = accel
                return True
            time.sleep(0.02 if self.template is not None else 0.05)
        self._kill_all()
        return False

    def _restore_once(self, accel: str, timeout: float) -> bool:
        """Start from the template: its device state, its RAM mapped private (or copied into
        shared memory when virtio-fs is wanted), then a fresh identity and the hot-plugs."""
        from qemu import template as tpl_mod

        tpl = tpl_mod.Template(Path(self.template))
        try:
            tpl.check(self, accel)
        except tpl_mod.TemplateError as exc:
            raise BootError(str(exc)) from None
        want_fs = self.virtiofs is True
        self.phases = {}
        begin = time.monotonic()
        mark = lambda name: self.phases.__setitem__(name, round(time.monotonic() - begin, 4))  # noqa: E731
        if want_fs and self.machine_type not in tpl_mod.HOTPLUG_MACHINES:
            raise BootError(f"virtio-fs after a restore is hot-plugged, and {self.machine_type} cannot "
                            f"hot-plug: use q35, or a template-less boot")
        fds: tuple[int, ...] = ()
        if want_fs:
            fd = tpl_mod.shared_copy(tpl)
            mark("shared RAM copied")
            fds = (fd,)
            memory = f"memory-backend-file,id=mem,size={self.memory_size},mem-path=/dev/fd/{fd},share=on"
        else:
            memory = f"memory-backend-file,id=mem,size={self.memory_size},mem-path={tpl.memory},share=off"
        argv = self._qemu_argv(accel, memory) + tpl_mod.incoming_args()

        def load() -> None:
            mark("qemu started")
            tpl_mod.load_state(self, tpl)
            mark("state loaded")

        try:  # the first answer is to ReseedRandomDev: no other call reaches the guest before it
            ok = self._launch(argv, accel, timeout, pass_fds=fds, after=load, probe=tpl_mod.refresh_identity)
        except tpl_mod.TemplateError as exc:
            self._kill_all()
            raise BootError(f"{exc}; qemu: {self._qemu_log_tail()}") from None
        finally:
            for fd in fds:
                os.close(fd)
        if not ok:
            return False
        self.restored = True
        mark("reseeded and time set")
        try:
            if want_fs:
                self._hotplug_virtiofs()
                mark("virtio-fs")
        except Exception as exc:  # noqa: BLE001 - any failure here leaves a guest not to hand out
            self._kill_all()
            raise BootError(f"restored guest: {exc}") from exc
        self.boot_seconds = time.monotonic() - begin
        return True

    def _hotplug_virtiofs(self, timeout: float = 20.0) -> None:
        """virtiofsd, then a vhost-user-fs device on the template's free PCI slot; returns once the
        guest's driver has taken the device (QEMU reports DRIVER_OK)."""
        from qemu.template import FS_PORT

        if not self._start_virtiofsd():
            raise BootError("virtiofsd did not start")
        self.qmp("chardev-add", id="vfs", backend={"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": str(self.virtiofs_socket)}}, "server": False}})
        bus = FS_PORT if self.machine_type == "q35" else "pci.0"
        self.qmp("device_add", driver="vhost-user-fs-pci", id="vfs0", chardev="vfs", tag=SHARE_TAG,
                 bus=bus, **{"queue-size": 1024})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.qmp("x-query-virtio-status", path="/machine/peripheral/vfs0/virtio-backend")
            if "DRIVER_OK" in json.dumps(st.get("status", {})):
                return
            time.sleep(0.02)
        raise BootError("the guest did not take the hot-plugged virtio-fs device")

    def start(self) -> "Guest":
        if self.proc and self.proc.poll() is None:
            return self
        if self.run_dir is None:
            runtime_dir().mkdir(parents=True, exist_ok=True)
            self.run_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=runtime_dir()))
            self._own_run_dir = True
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)  # its sockets reach the agent, QEMU's monitor and the shared files
        if self.share_dir is None:
            self.share_dir = self.run_dir / "shared"
        Path(self.share_dir).mkdir(parents=True, exist_ok=True)
        if self.accel not in ("auto", "kvm", "tcg"):
            raise ValueError(f"accel must be auto, kvm or tcg, not {self.accel!r}")
        attempts: list[tuple[str, float]] = []
        if self.template is not None:  # the accelerator the template was made with, only
            from qemu.template import Template, TemplateError

            try:
                made_with = Template(Path(self.template)).manifest().get("accel", "")
            except TemplateError as exc:
                raise BootError(str(exc)) from None
            if self.accel not in ("auto", made_with):
                raise BootError(f"the template was made under {made_with}, not {self.accel}")
            attempts.append((made_with, self.boot_timeout))
        elif self.accel in ("auto", "kvm") and kvm_usable(self.arch):
            attempts.append(("kvm", self.kvm_timeout if self.accel == "auto" else self.boot_timeout))
        elif self.accel == "kvm":
            raise BootError("--accel kvm: /dev/kvm is not usable for this arch")
        if self.accel in ("auto", "tcg") and self.template is None:
            attempts.append(("tcg", self.boot_timeout))
        for accel, timeout in attempts:
            if self._boot_once(accel, timeout):
                if self.addr_file:
                    self.write_addr_file(Path(self.addr_file))
                return self
        raise BootError(f"guest did not answer Health.Check ({', '.join(a for a, _ in attempts)}); "
                        f"qemu: {self._qemu_log_tail()}\nconsole tail:\n{self.console_tail()}")

    def _qemu_log_tail(self) -> str:
        try:
            return (self.run_dir / "qemu.log").read_text(errors="replace")[-2000:].strip()
        except OSError:
            return ""

    def console_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def info(self) -> dict:
        return {"addr": self.addr, "pid": self.pid, "qmp": str(self.qmp_socket),
                "shared_dir": str(self.share_dir), "share_tag": SHARE_TAG if self.virtiofsd_proc else None,
                "console_log": str(self.console_log), "arch": self.arch, "accel": self.used_accel,
                "virtiofsd_pid": self.virtiofsd_proc.pid if self.virtiofsd_proc else None,
                "run_dir": str(self.run_dir), "boot_seconds": round(self.boot_seconds, 3),
                "restored": self.restored}

    def write_addr_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info(), indent=2) + "\n")
        tmp.replace(path)

    def qmp(self, command: str, **arguments) -> dict:
        """Run one QMP command on a fresh connection; returns its "return" value."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            deadline = time.monotonic() + 2
            while True:  # the socket file exists a moment before QEMU listens on it
                try:
                    s.connect(str(self.qmp_socket))
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.005)
            f = s.makefile("rwb")

            def recv() -> dict:
                while True:
                    line = f.readline()
                    if not line:
                        raise BootError("QMP connection closed")
                    msg = json.loads(line)
                    if "event" not in msg:
                        return msg

            recv()  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                req = {"execute": cmd}
                if args:
                    req["arguments"] = args
                f.write(json.dumps(req).encode() + b"\n")
                f.flush()
                msg = recv()
                if "error" in msg:
                    raise BootError(f"QMP {cmd}: {msg['error']}")
            return msg.get("return", {})

    def shell(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run a command in the guest's debug shell (needs debug_console=True): (status, output)."""
        import re

        if not self.debug_console:
            raise BootError("Guest.shell() needs debug_console=True")
        if self._shell is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(self.shell_socket))
            self._shell = s
            self._shell_run("stty -echo 2>/dev/null; PS1=''; PS2=''", timeout)
        return self._shell_run(command, timeout)

    def _shell_run(self, command: str, timeout: float) -> tuple[int, str]:
        import re

        assert self._shell is not None
        self._seq += 1
        mark = f"@@{self._seq}@@"
        # the marker is split in the sent text, so an echo of the input never matches
        line = f'{command}\necho "@@{self._seq}""@@:$?"\n'
        self._shell.sendall(line.encode())
        buf = b""
        pat = re.compile(re.escape(mark).encode() + rb":(\d+)")
        deadline = time.monotonic() + timeout
        while True:
            m = pat.search(buf)
            if m:
                out = buf[: m.start()].decode(errors="replace").replace("\r\n", "\n")
                return int(m.group(1)), out
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest shell: {command!r} did not finish; output so far: {buf[-500:]!r}")
            self._shell.settimeout(left)
            chunk = self._shell.recv(65536)
            if not chunk:
                raise BootError("guest shell closed")
            buf += chunk

    def running(self) -> bool:
        return bool(self.proc and self.proc.poll() is None)

    def wait(self, timeout: float | None = None) -> int | None:
        if not self.proc:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    @staticmethod
    def _kill(proc: subprocess.Popen | None, grace: float = 3.0) -> None:
        if not proc or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def _kill_all(self) -> None:
        if self._shell is not None:
            self._shell.close()
            self._shell = None
        self._kill(self.proc)
        self._kill(self.virtiofsd_proc)
        self.virtiofsd_proc = None

    def stop(self, grace: float = 0.0) -> None:
        """Give a guest that is powering itself off `grace` seconds, then QMP quit, then kill."""
        if self.running() and grace:
            self.wait(grace)
        if self.running():
            try:
                self.qmp("quit")
            except (OSError, BootError, ValueError):
                pass
            if self.wait(5) is None:
                self._kill(self.proc)
        self._kill_all()
        if self.addr_file:
            try:
                data = json.loads(Path(self.addr_file).read_text())
                if data.get("pid") == self.pid:
                    Path(self.addr_file).unlink()
            except (OSError, ValueError):
                pass

    def cleanup(self) -> None:
        self.stop()
        if self._own_run_dir and self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> "Guest":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()


def stop_from_addr_file(path: Path, timeout: float = 10.0) -> bool:
    """Stop a guest that qemu/boot.py started in the background (by the pids it recorded)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    pid = info.get("pid")
    qmp = info.get("qmp")
    if qmp and os.path.exists(qmp):
        g = Guest(run_dir=Path(info["run_dir"]))
        try:
            g.qmp("quit")
        except (OSError, BootError, ValueError):
            pass
    for p in (pid, info.get("virtiofsd_pid")):
        if not p:
            continue
        deadline = time.monotonic() + timeout
        while _pid_alive(p, info) and time.monotonic() < deadline:
            time.sleep(0.1)
            if time.monotonic() > deadline - timeout / 2:
                _signal(p, signal.SIGTERM)
        if _pid_alive(p, info):
            _signal(p, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True


def _pid_alive(pid: int, info: dict) -> bool:
    """Alive and still one of ours (its command line names our run dir)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
    except OSError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return info.get("run_dir", "\0") in cmd


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass
