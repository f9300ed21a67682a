#!/usr/bin/env python3
"""``ctr run --rm IMAGE ID true`` end to end through a real containerd: our shim
(io.containerd.kata-py.v2, one QEMU guest per task, from a template) beside runc's
(io.containerd.runc.v2), interleaved, and where the shim's time goes.

    python3 bench/containerd.py [--runs 5] [--json out.json]

containerd is private to the run (tests/vm/containerd_support.py: its own config, root, state and
sockets in a temporary directory). One warm-up run of each runtime is left out (the first kata
task makes the VM template). The breakdown comes from the shim's own marks (KATA_SHIM_TIMINGS):

  vm boot        Create received -> the guest's agent answers (rootfs mounted, template restored,
                 reseeded, virtio-fs hot-plugged)
  agent create   connection, CreateSandbox, CreateContainer
  agent start    StartContainer
  run            started -> the process's exit seen and its output written out
  agent delete   RemoveContainer, DestroySandbox
  teardown       VM stopped (QMP quit), virtiofsd gone, rootfs unmounted, run directory removed
  other          the rest of ctr's wall time: ctr, containerd, the shim's start (two Python
                 start-ups: `start` and the daemon it leaves), Wait/Delete/Shutdown round trips

runc's shim keeps its sockets under /run/containerd/s and runc's state under /run/containerd/runc
(built in); when /run/containerd did not exist before, the empty directories it leaves are removed.
Everything else stays in the temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.vm.containerd_support import IMAGE, Containerd  # noqa: E402

RUNTIMES = {"kata-py": "io.containerd.kata-py.v2", "runc": "io.containerd.runc.v2"}
PHASES = [("vm boot", "create", "vm ready"), ("agent create", "vm ready", "container created"),
          ("agent start", "start", "started"), ("run", "started", "output drained"),
          ("agent delete", "delete", "container removed"), ("teardown", "container removed", "vm stopped")]


def run_once(c: Containerd, runtime: str) -> float:
    cid = f"b-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    c.ctr("run", "--rm", "--runtime", runtime, "--fifo-dir", str(c.fifo_dir), IMAGE, cid, "true")
    return time.perf_counter() - t0


def last_timeline(path: Path) -> dict:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["timeline"] if lines else {}


def breakdown(wall: float, tl: dict) -> dict[str, float]:
    out = {}
    for name, start, end in PHASES:
        if start in tl and end in tl:
            out[name] = tl[end] - tl[start]
    out["other"] = wall - sum(out.values())
    return out


def med(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:8.0f}" if values else "       -"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if os.geteuid() != 0:
        print("bench/containerd.py runs containerd: run it as root", file=sys.stderr)
        return 2
    run_containerd = Path("/run/containerd")
    made_run_containerd = not run_containerd.exists()
    c = Containerd()
    timings = c.dir / "timings.jsonl"
    os.environ["KATA_SHIM_TIMINGS"] = str(timings)  # containerd passes it on to the shims
    walls: dict[str, list[float]] = {k: [] for k in RUNTIMES}
    parts: dict[str, list[float]] = {}
    try:
        c.start()
        c.import_image()
        for name, runtime in RUNTIMES.items():  # warm-up: the template, page cache, containerd
            run_once(c, runtime)
        for i in range(a.runs):
            order = list(RUNTIMES.items()) if i % 2 == 0 else list(reversed(RUNTIMES.items()))
            for name, runtime in order:
                wall = run_once(c, runtime)
                walls[name].append(wall)
                if name == "kata-py":
                    for part, seconds in breakdown(wall, last_timeline(timings)).items():
                        parts.setdefault(part, []).append(seconds)
        left = c.leftovers()
    finally:
        c.stop()
        if made_run_containerd and run_containerd.exists():  # runc's shim made it: only empty dirs go
            for d in sorted((p for p in run_containerd.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass
            try:
                run_containerd.rmdir()
            except OSError:
                pass
    print(f"ctr run --rm {IMAGE} ID true, median of {a.runs} (ms; interleaved, after one warm-up each)")
    for name in RUNTIMES:
        print(f"  {name:<14}{med(walls[name])}   (min {min(walls[name]) * 1000:.0f}, max {max(walls[name]) * 1000:.0f})")
    print("kata-py, where the time goes (ms, medians; see the docstring):")
    for part, values in parts.items():
        print(f"  {part:<14}{med(values)}")
    if left:
        print(f"LEFT BEHIND: {left}", file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps({"walls": walls, "kata_parts": parts}, indent=2) + "\n")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
