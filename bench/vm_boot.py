#!/usr/bin/env python3
"""Boot-to-first-Health.Check of the guest under QEMU, per arch, plus image sizes and agent RSS.

    python3 bench/vm_boot.py [--arch x86_64 --arch aarch64] [--runs 3] [--accel tcg] [--stub]
                             [--machine microvm|q35] [--cpu max] [--json out.json]

Each run is a fresh QEMU (start -> Health.Check answered on a fresh channel -> stop). Reported:
median/min/max seconds, the kernel's own timestamp of PID-1 set-up when the console shows it,
the agent's VmRSS (via the debug shell), and the sizes of kernel and initrd.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.vm import Guest, image_dir  # noqa: E402


def one(arch: str, a) -> dict:
    extra = "agent.stub" if a.stub else ""
    g = Guest(arch=arch, accel=a.accel, machine=a.machine, cpu=a.cpu, debug_console=True,
              cmdline=extra, name=f"bench-{arch}", boot_timeout=180)
    try:
        g.start()
        rss = None
        try:
            _, out = g.shell("grep VmRSS /proc/1/status", timeout=20)
            m = re.search(r"VmRSS:\s+(\d+)", out)
            rss = int(m.group(1)) if m else None
        except Exception:  # noqa: BLE001 - RSS is a bonus
            pass
        log = g.console_log.read_text(errors="replace")
        return {"seconds": round(g.boot_seconds, 3), "accel": g.used_accel, "agent_rss_kib": rss,
                "pid1_setup": (re.search(r"pid1 set-up ([\d.]+)s", log) or [None, None])[1]}
    finally:
        g.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=["x86_64", "aarch64"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--accel", default="tcg", choices=["auto", "kvm", "tcg"])
    p.add_argument("--machine", default=None)
    p.add_argument("--cpu", default=None)
    p.add_argument("--stub", action="store_true", help="boot the stub health server, not the agent")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    results = {}
    for arch in a.arch or ["x86_64", "aarch64"]:
        runs = [one(arch, a) for _ in range(a.runs)]
        secs = [r["seconds"] for r in runs]
        m = json.loads((image_dir(arch) / "manifest.json").read_text())
        results[arch] = {
            "boot_to_health_median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
            "runs": runs, "kernel_bytes": m["kernel"]["size"], "initrd_bytes": m["initrd"]["size"],
            "compression": m["compression"], "kernel_version": m["kernel_version"],
        }
        r = results[arch]
        print(f"{arch:8s} {runs[0]['accel']:4s} boot->Health.Check median {r['boot_to_health_median_s']:.2f}s "
              f"(min {r['min_s']:.2f}, max {r['max_s']:.2f}, n={len(secs)}); "
              f"agent RSS {runs[-1]['agent_rss_kib']} KiB; kernel {r['kernel_bytes'] / 1e6:.1f} MB, "
              f"initrd {r['initrd_bytes'] / 1e6:.1f} MB ({r['compression']})", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
