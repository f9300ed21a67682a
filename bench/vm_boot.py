#!/usr/bin/env python3
"""Boot of the guest under QEMU, from QEMU's start to the first answered Health.Check, laid out on
one clock: where the time goes, the agent beside the bare health server (``--stub``), interleaved.

    python3 bench/vm_boot.py [--arch x86_64 --arch aarch64] [--runs 3] [--accel tcg]
                             [--variant SPEC ...] [--template [--virtiofs]] [--imports] [--json out.json]

A variant is ``NAME[;stub][;image=DIR][;cmdline=KERNEL ARGS][;probe=ttrpc|grpc]``; the defaults
are ``agent`` (the real agent as PID 1, asked over ttrpc as a Kata shim would), ``agent-grpc``
(the same, asked over gRPC: its first gRPC connection makes the agent import grpcio) and ``stub``
(guest-image/stub_agent.py: PID-1 set-up, then a bare grpcio health server). Each run boots one fresh QEMU per variant, the variants in turn (the order flips
every run), so that a slow minute of this shared machine hits all of them alike. ``--template``
adds the variant ``template``: a template of the agent's guest is made first (qemu/template.py),
then each run starts one guest from it; its row "ready" is QEMU's start to the first answer, which
is ReseedRandomDev followed by SetGuestDateTime (with ``--virtiofs``: and virtio-fs hot-plugged,
q35 only).

Where the times come from:
- the kernel's log (``dmesg`` through the debug shell): the kernel's own messages and the records
  that ``agent.boottrace`` writes there from /init on (marks, and the imports that took 10 ms or
  more), all on the kernel's clock;
- the agent's "agent serving" log line on the console (its wall time, placed on the kernel's
  clock by the wall time of /init's first mark): every handler is in place; "listening" (a mark)
  is earlier: the agent answers Health from then on, and AgentService calls wait for "serving";
- the host: QEMU's start and the first answered Health.Check, placed on the guest's clock by
  writing a line into the guest's kernel log from the host (three tries; the shortest round trip
  is kept, so the placement is good to half of it, printed as ``sync``).

Reported per variant: each milestone's median over the runs with min and max, in seconds since
QEMU's start; with ``--imports`` the import tree too; RSS of PID 1 and the spawner. For the agent,
"CreateSandbox answered" too: a CreateSandbox sent as soon as Health.Check answered, as Kata's
runtime does (the stub serves nothing but health).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.template import make_template  # noqa: E402
from qemu.vm import Guest, image_dir  # noqa: E402

KMSG_LINE = re.compile(r"^\[\s*([\d.]+)\] (.*)$")
BOOT_RECORD = re.compile(r"kata-boot: (mark|import) (\S+) mono=([\d.]+)(.*)$")
KERNEL_EVENTS = {  # dmesg text -> milestone
    "Trying to unpack rootfs image as initramfs": "initramfs unpack starts",
    "Freeing initrd memory": "initramfs unpacked",
    "Run /init as init process": "kernel runs /init",
}
# Milestones in the order of a boot; a variant shows those it reaches.
MILESTONES = (
    "qemu start", "kernel start", "initramfs unpack starts", "initramfs unpacked",
    "kernel runs /init", "python runs /init", "agent main", "stub main", "pid1 set-up done",
    "spawner started", "spawner ready", "stub imported grpc", "listening", "serving", "gRPC started", "health answered",
    "CreateSandbox answered",
    "template loaded", "shared RAM copied", "ready (reseeded, clock set)", "virtio-fs hot-plugged",
)
RESTORE_PHASES = {"shared RAM copied": "shared RAM copied", "state loaded": "template loaded",
                  "reseeded and time set": "ready (reseeded, clock set)", "virtio-fs": "virtio-fs hot-plugged"}


@dataclass
class Variant:
    name: str
    stub: bool = False
    image: Path | None = None
    cmdline: str = ""
    template: Path | None = None  # start from this template
    virtiofs: bool = False
    probe: str = ""  # the first Health.Check over ttrpc or grpc (default: grpc for the stub only)

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        name, *parts = spec.split(";")
        v = cls(name=name, stub=name == "stub")
        for part in parts:
            key, _, value = part.partition("=")
            if key == "stub":
                v.stub = True
            elif key == "image":
                v.image = Path(value)
            elif key == "cmdline":
                v.cmdline = value
            elif key == "probe" and value in ("ttrpc", "grpc"):
                v.probe = value
            else:
                raise SystemExit(f"--variant {spec!r}: unknown part {part!r}")
        return v


@dataclass
class Run:
    seconds: float
    events: dict[str, float] = field(default_factory=dict)   # milestone -> s since QEMU start
    imports: list[dict] = field(default_factory=list)        # name, start, s, parent
    sync_rtt: float | None = None
    rss_kib: dict[str, int] = field(default_factory=dict)
    console_errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing

def parse_kmsg(text: str) -> tuple[dict[str, float], list[dict], list[tuple[str, float]]]:
    """dmesg -> (kernel milestones, boot records, sync lines) on the kernel's clock."""
    kernel: dict[str, float] = {}
    records: list[dict] = []
    syncs: list[tuple[str, float]] = []
    for line in text.splitlines():
        m = KMSG_LINE.match(line.strip())
        if not m:
            continue
        ts, msg = float(m.group(1)), m.group(2)
        for needle, event in KERNEL_EVENTS.items():
            if msg.startswith(needle):
                kernel.setdefault(event, ts)
        r = BOOT_RECORD.search(msg)
        if r:
            fields = dict(kv.split("=", 1) for kv in r.group(4).split() if "=" in kv)
            records.append({"kind": r.group(1), "name": r.group(2), "mono": float(r.group(3)),
                            "printk": ts, **fields})
        elif msg.startswith("kata-boot: sync "):
            syncs.append((msg.split()[-1], ts))
    return kernel, records, syncs


def mono_to_printk(records: list[dict]) -> float:
    """The kernel's log clock minus CLOCK_MONOTONIC: the smallest lag of a record written at once."""
    lags = [r["printk"] - r["mono"] - float(r.get("s", 0) if r["kind"] == "import" else 0)
            for r in records]
    return min(lags) if lags else 0.0


def serving_wall(console: str, msg: str = "agent serving") -> float | None:
    """Wall time of the agent's first log line ``msg`` on the console."""
    for line in console.splitlines():
        if f'"{msg}"' not in line or not line.startswith("{"):
            continue
        try:
            t = json.loads(line)["time"]
        except (ValueError, KeyError):
            continue
        return datetime.strptime(t, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    return None


# --------------------------------------------------------------------------- one boot

def sync_clock(g: Guest, tries: int = 3) -> tuple[float, float]:
    """Host monotonic time of the guest kernel log's zero, and the round trip it was taken with."""
    g.shell("true")  # the shell's own set-up out of the way
    samples = []
    for i in range(tries):
        h0 = time.monotonic()
        g.shell(f"echo '<7>kata-boot: sync {i}' > /dev/kmsg")
        samples.append((time.monotonic() - h0, h0, str(i)))
    _, out = g.shell("dmesg | grep 'kata-boot: sync'")
    _, _, syncs = parse_kmsg(out)
    at = dict(syncs)
    rtt, h0, key = min(s for s in samples if s[2] in at)
    return h0 + rtt / 2 - at[key], rtt


def rss(g: Guest) -> dict[str, int]:
    script = ("for d in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $d/cmdline 2>/dev/null); "
              "case \"${d#/proc/}:$c\" in 1:*) n=pid1;; *agent.runtime.spawner*) n=spawner;; *) continue;; esac; "
              "echo \"$n $(grep VmRSS $d/status | tr -s ' ' | cut -d' ' -f2)\"; done")
    _, out = g.shell(script, timeout=30)
    found: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            found.setdefault(parts[0], int(parts[1]))
    return found


def guest_for(arch: str, v: Variant, a, **extra) -> Guest:
    cmdline = " ".join(x for x in ("agent.stub" if v.stub else "", v.cmdline) if x)
    # TCP for every variant: the bare stub server has no other channel, and one channel keeps it fair
    return Guest(arch=arch, accel=a.accel, machine=a.machine, cpu=a.cpu, debug_console=True, probe=v.probe, channel="tcp",
                 cmdline=cmdline, image=v.image, name=f"bench-{arch}-{v.name}", boot_timeout=300, **extra)


def create_sandbox(g: Guest) -> float:
    """The host's monotonic time when a CreateSandbox sent right after the first Health.Check was
    answered: what a Kata runtime asks next, so work an agent moved after its Health shows here."""
    from agent import ttrpc
    from agent.config import parse_address
    from agent.protocols import agent_pb2
    from kata_agent_client.dial import dial

    client = ttrpc.Client(dial(parse_address(g.addr), timeout=30))
    try:
        request = agent_pb2.CreateSandboxRequest(hostname="bench", sandbox_id="bench")
        client.call("grpc.AgentService", "CreateSandbox", request.SerializeToString(), timeout=60)
        return time.monotonic()
    finally:
        client.close()


def host_memory(g: Guest) -> dict[str, int]:
    """QEMU's memory on the host (KiB): what it has to itself, and its proportional share."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{g.pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty", "Rss"):
                    out[key] = int(rest.split()[0])
    except (OSError, TypeError, ValueError):
        return {}
    return {"qemu_private": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0),
            "qemu_pss": out.get("Pss", 0)}


def one_restore(arch: str, v: Variant, a) -> Run:
    g = guest_for(arch, v, a, template=v.template, virtiofs=v.virtiofs)
    try:
        g.start()
        run = Run(seconds=round(g.boot_seconds, 3))
        # 0 is the call to start(): a shared RAM copy, when there is one, comes before QEMU's start
        run.events["qemu start"] = g.phases.get("qemu started", 0.0)
        for phase, event in RESTORE_PHASES.items():
            if phase in g.phases:
                run.events[event] = g.phases[phase]
        try:
            run.rss_kib = rss(g)
        except Exception:  # noqa: BLE001 - RSS is a bonus
            pass
        run.rss_kib.update(host_memory(g))
        return run
    finally:
        g.cleanup()


def one(arch: str, v: Variant, a) -> Run:
    if v.template is not None:
        return one_restore(arch, v, a)
    g = guest_for(arch, v, a)
    try:
        g.start()
        run = Run(seconds=round(g.boot_seconds, 3))
        sandbox_at = None if v.stub else create_sandbox(g)
        zero, run.sync_rtt = sync_clock(g)
        _, kmsg = g.shell("dmesg", timeout=60)
        console = g.console_log.read_text(errors="replace")
        kernel, records, _ = parse_kmsg(kmsg)
        lag = mono_to_printk(records)
        since = lambda printk: round(printk + zero - g.launched_at, 4)  # noqa: E731
        ev = run.events
        ev["qemu start"] = 0.0
        ev["kernel start"] = since(0.0)
        for name, ts in kernel.items():
            ev[name] = since(ts)
        marks = {r["name"]: r for r in records if r["kind"] == "mark"}
        for mark, event in (("init-start", "python runs /init"), ("agent-main", "agent main"),
                            ("stub-main", "stub main"), ("spawner-started", "spawner started"),
                            ("spawner-ready", "spawner ready"), ("stub-imported", "stub imported grpc"),
                            ("stub-serving", "serving"), ("listening", "listening")):
            if mark in marks:
                ev[event] = since(marks[mark]["mono"] + lag)
        if "pid1-setup" in marks:
            r = marks["pid1-setup"]
            ev["pid1 set-up done"] = since(r["mono"] + float(r.get("s", 0)) + lag)
        for msg, event in (("agent serving", "serving"), ("gRPC started", "gRPC started")):
            wall = serving_wall(console, msg)
            if wall is not None and "init-start" in marks and "wall" in marks["init-start"]:
                r = marks["init-start"]
                ev[event] = since(r["mono"] + wall - float(r["wall"]) + lag)
        ev["health answered"] = round(g.ready_at - g.launched_at, 4)
        if sandbox_at is not None:
            ev["CreateSandbox answered"] = round(sandbox_at - g.launched_at, 4)
        run.imports = [{"name": r["name"], "start": since(r["mono"] + lag), "s": float(r["s"]),
                        "in": r.get("in", "-")} for r in records if r["kind"] == "import"]
        try:
            run.rss_kib = rss(g)
        except Exception:  # noqa: BLE001 - RSS is a bonus
            pass
        run.rss_kib.update(host_memory(g))
        run.console_errors = [l for l in console.splitlines() if "Traceback" in l or '"level": "error"' in l]
        return run
    finally:
        g.cleanup()


# --------------------------------------------------------------------------- report

def spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):6.2f} [{min(values):.2f}-{max(values):.2f}]"


def milestone_table(arch: str, results: dict[str, list[Run]]) -> str:
    names = list(results)
    rows = [f"{arch}: seconds since QEMU start, median [min-max] of {max(len(r) for r in results.values())}",
            f"  {'milestone':24s}" + "".join(f"{n:>24s}" for n in names)]
    for ms in MILESTONES:
        cells = []
        for n in names:
            vals = [r.events[ms] for r in results[n] if ms in r.events]
            cells.append(spread(vals) if vals else "-")
        if any(c != "-" for c in cells):
            rows.append(f"  {ms:24s}" + "".join(f"{c:>24s}" for c in cells))
    for key, label in (("pid1", "guest RSS MB, PID 1"), ("spawner", "guest RSS MB, spawner"),
                       ("qemu_private", "host MB, QEMU private"), ("qemu_pss", "host MB, QEMU PSS")):
        cells = []
        for n in names:
            vals = [r.rss_kib[key] / 1024 for r in results[n] if key in r.rss_kib]
            cells.append(spread(vals) if vals else "-")
        if any(c != "-" for c in cells):
            rows.append(f"  {label:24s}" + "".join(f"{c:>24s}" for c in cells))
    rtts = [r.sync_rtt * 1000 for rs in results.values() for r in rs if r.sync_rtt is not None]
    if rtts:
        rows.append(f"  (host/guest clock placed to within {max(rtts) / 2:.1f} ms)")
    return "\n".join(rows)


def import_tree(name: str, runs: list[Run], min_s: float = 0.03) -> str:
    """Imports asked for by PID 1 itself (top level) with their larger children, medians."""
    by: dict[tuple[str, str], list[float]] = {}
    first: dict[tuple[str, str], float] = {}
    for run in runs:
        for r in run.imports:
            key = (r["in"], r["name"])
            by.setdefault(key, []).append(r["s"])
            first[key] = min(first.get(key, 1e9), r["start"])
    med = {k: statistics.median(v) for k, v in by.items()}
    lines = [f"imports of {name} (inclusive seconds, median; children of {min_s:.2f} s or more)"]

    def walk(parent: str, depth: int) -> None:
        kids = sorted((k for k in med if k[0] == parent and med[k] >= min_s), key=lambda k: first[k])
        for k in kids:
            lines.append(f"  {'  ' * depth}{k[1]:{40 - 2 * depth}s} {med[k]:6.3f}  at {first[k]:6.2f}")
            if depth < 3:
                walk(k[1], depth + 1)

    walk("-", 0)
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", choices=["x86_64", "aarch64"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--accel", default="tcg", choices=["auto", "kvm", "tcg"])
    p.add_argument("--machine", default=None)
    p.add_argument("--cpu", default=None)
    p.add_argument("--variant", action="append", type=Variant.parse,
                   help="NAME[;stub][;image=DIR][;cmdline=ARGS][;probe=ttrpc|grpc] (default: agent, agent-grpc, stub)")
    p.add_argument("--stub", action="store_true", help="only the stub (same as --variant stub)")
    p.add_argument("--template", action="store_true", help="also start guests from a template of the agent's")
    p.add_argument("--virtiofs", action="store_true", help="with --template: hot-plug virtio-fs (q35)")
    p.add_argument("--imports", action="store_true", help="print the import tree of each variant")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    variants = a.variant or ([Variant("stub", stub=True)] if a.stub else [
        Variant("agent"), Variant("agent-grpc", probe="grpc"), Variant("stub", stub=True)])
    report: dict = {}
    for arch in a.arch or ["x86_64", "aarch64"]:
        tdir = None
        if a.template:
            tdir = Path(tempfile.mkdtemp(prefix="kata-bench-template-", dir="/dev/shm"))
            tpl = make_template(guest_for(arch, Variant("template"), a), tdir / "t")
            print(f"  {arch} template made: boot {tpl.manifest()['boot_seconds']:.2f} s, state "
                  f"{tpl.manifest()['state_bytes']} bytes", file=sys.stderr, flush=True)
            variants = [v for v in variants if v.template is None] + [
                Variant("template", template=tpl.dir, virtiofs=a.virtiofs)]
        results: dict[str, list[Run]] = {v.name: [] for v in variants}
        for i in range(a.runs):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                run = one(arch, v, a)
                results[v.name].append(run)
                print(f"  {arch} {v.name:10s} run {i + 1}: {run.seconds:.2f} s", file=sys.stderr, flush=True)
                for err in run.console_errors[:3]:
                    print(f"    console: {err[:200]}", file=sys.stderr)
        m = json.loads((image_dir(arch) / "manifest.json").read_text())
        print(milestone_table(arch, results))
        print(f"  kernel {m['kernel']['size'] / 1e6:.1f} MB, initrd {m['initrd']['size'] / 1e6:.1f} MB "
              f"({m['compression']}), {m['kernel_version']}")
        if a.imports:
            for name, runs in results.items():
                print(import_tree(name, runs))
        print(flush=True)
        report[arch] = {n: [r.__dict__ for r in runs] for n, runs in results.items()}
        if tdir is not None:
            shutil.rmtree(tdir, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
