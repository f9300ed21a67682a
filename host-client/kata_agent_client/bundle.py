"""Build a small OCI bundle from the host's busybox-static: a rootfs and a config.json.

    python3 -m kata_agent_client.bundle DIR [-- ARGS...]      # writes DIR/rootfs and DIR/config.json
    BUSYBOX=/path/to/arm64/busybox python3 -m kata_agent_client.bundle DIR   # another arch's busybox

The rootfs holds /bin/busybox with a symlink per applet, /etc/passwd, /etc/group, /etc/hostname,
empty mount points (/proc, /sys, /dev, /tmp, ...) and an empty /etc/resolv.conf for the sandbox's
DNS to be mounted over. busybox must be statically linked (Debian: busybox-static).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kata_agent_client.spec import default_config

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/sbin/busybox")
DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "run",
        "var/tmp", "home")


class BundleError(RuntimeError):
    pass


def find_busybox() -> str:
    for path in (os.environ.get("BUSYBOX"), *BUSYBOX_CANDIDATES, shutil.which("busybox")):
        if path and os.access(path, os.X_OK) and is_static(path):
            return path
    raise BundleError("no statically linked busybox found (apt-get install busybox-static)")


def is_static(path: str) -> bool:
    """An ELF without a PT_INTERP program header (no dynamic loader needed)."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    order = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off:off + 4], order) == 3:  # PT_INTERP
            return False
    return True


def applets(busybox: str) -> list[str]:
    """Its applets as paths (bin/sh, ...); a busybox of another arch is asked through the host's."""
    try:
        out = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout
    except OSError:  # ENOEXEC: another architecture (the guest's), and no binfmt here
        host = shutil.which("busybox") or next((c for c in BUSYBOX_CANDIDATES if os.access(c, os.X_OK)), None)
        if not host or os.path.realpath(host) == os.path.realpath(busybox):
            raise BundleError(f"{busybox}: cannot run it to list its applets, and no host busybox") from None
        out = subprocess.run([host, "--list-full"], capture_output=True, text=True, check=True).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def make_rootfs(root: Path, busybox: str | None = None) -> Path:
    busybox = busybox or find_busybox()
    root.mkdir(parents=True, exist_ok=True)
    for d in DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    shutil.copy2(busybox, root / "bin/busybox")
    os.chmod(root / "bin/busybox", 0o755)
    for full in applets(busybox):
        link = root / full
        if full == "bin/busybox" or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(root / "bin/busybox", link.parent))
    etc = root / "etc"
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (etc / "group").write_text("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    (etc / "hostname").write_text("container\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "resolv.conf").write_text("")
    return root


def make_bundle(bundle: Path, args: list[str] | None = None, *, terminal: bool = False,
                hostname: str = "busybox", busybox: str | None = None) -> Path:
    """bundle/rootfs (busybox) and bundle/config.json (runc's defaults running ``args``)."""
    bundle = Path(bundle)
    make_rootfs(bundle / "rootfs", busybox)
    write_config(bundle, args, terminal=terminal, hostname=hostname)
    return bundle


def write_config(bundle: Path, args: list[str] | None = None, *, terminal: bool = False,
                 hostname: str = "busybox") -> dict:
    cfg = default_config(args or ["sh"], terminal=terminal, hostname=hostname)
    (Path(bundle) / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--hostname", default="busybox")
    p.add_argument("--tty", "-t", action="store_true")
    p.add_argument("args", nargs="*", help="the container's command (default: sh)")
    a = p.parse_args(argv)
    try:
        make_bundle(a.bundle, a.args or None, terminal=a.tty, hostname=a.hostname)
    except (BundleError, OSError, subprocess.CalledProcessError) as exc:
        print(f"bundle: {exc}", file=sys.stderr)
        return 1
    print(a.bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
