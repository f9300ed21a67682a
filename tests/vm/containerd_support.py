"""A private containerd (Debian's package) for the shim's tests and bench/containerd.py.

Everything lives in one temporary directory: config, root, state, sockets, the FIFOs ctr makes,
the shim's run directories and its VM template. The machine's own containerd paths are never
used. containerd finds the shim on its PATH (this venv's bin). ``stop`` ends containerd by its pid
and removes what is left.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNTIME = "io.containerd.kata-py.v2"
IMAGE = "docker.io/library/kata-busybox:latest"
NAMESPACE = "kata-py-test"


class Containerd:
    def __init__(self, root: Path | None = None, template_dir: Path | None = None) -> None:
        self.dir = Path(root or tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        self.template_dir = template_dir or Path(tempfile.mkdtemp(prefix="kata-shim-tpl-", dir="/dev/shm")) / "tpl"
        self.socket = self.dir / "c.sock"
        self.fifo_dir = self.dir / "fifo"
        self.proc: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    @property
    def shim_dir(self) -> Path:
        """Where the shims keep their run directories (beside containerd's socket)."""
        return self.dir / "kata-py"

    def env(self) -> dict:
        bin_dir = os.path.dirname(sys.executable)
        return dict(os.environ, PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
                    KATA_SHIM_TEMPLATE_DIR=str(self.template_dir))

    def start(self, timeout: float = 30.0) -> "Containerd":
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "version = 2\n"
            f'root = "{self.dir}/root"\n'
            f'state = "{self.dir}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "[grpc]\n"
            f'  address = "{self.socket}"\n'
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.dir}/opt"\n')
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([shutil.which("containerd") or "containerd", "--config", str(self.config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not come up:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def ctr(self, *args: str, check: bool = True, timeout: float = 300, input: bytes | None = None,
            namespace: str = NAMESPACE) -> subprocess.CompletedProcess:
        argv = ["ctr", "--address", str(self.socket), "--namespace", namespace, *args]
        r = subprocess.run(argv, capture_output=True, timeout=timeout, input=input,
                           stdin=None if input is not None else subprocess.DEVNULL)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {r.returncode}\nstdout: {r.stdout[-2000:]!r}\n"
                                 f"stderr: {r.stderr[-2000:]!r}\ncontainerd:\n{self.log_tail()}")
        return r

    def import_image(self) -> None:
        from kata_agent_client.oci_image import build

        archive = self.dir / "busybox.tar"
        build(archive, IMAGE)
        self.ctr("images", "import", str(archive))

    def run_args(self, *args: str) -> list[str]:
        """``ctr run`` with the shim as the runtime and the FIFOs in our directory."""
        return ["run", "--runtime", RUNTIME, "--fifo-dir", str(self.fifo_dir), *args]

    def leftovers(self) -> list[str]:
        """What shims left behind: processes naming their directory, mounts, run directories,
        sockets."""
        from agent.linux import mounts_under
        from kata_agent_client.shim.sandbox import processes_naming

        found = [f"process {p}" for p in processes_naming(self.shim_dir)]
        found += [f"mount {m}" for m in mounts_under(self.shim_dir)]
        if self.shim_dir.exists():
            found += [f"run dir {p}" for p in self.shim_dir.iterdir()]
        sockets = self.dir / "s"
        if sockets.exists():
            found += [f"socket {p}" for p in sockets.iterdir()]
        return found

    def stop(self) -> None:
        from kata_agent_client.shim.sandbox import cleanup

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.shim_dir.exists():  # what a failed test may have left: the shims' VMs and mounts
            for d in self.shim_dir.iterdir():
                cleanup(d)
        # containerd's own snapshot mounts, if it left any
        from agent.linux import mounts_under

        for m in mounts_under(self.dir):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.template_dir.parent, ignore_errors=True)
