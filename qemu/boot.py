#!/usr/bin/env python3
"""Boot the guest and print the agent's address once Health.Check answers.

    python3 qemu/boot.py [--arch x86_64|aarch64] [--accel auto|kvm|tcg] [--machine microvm|q35]
                         [--share DIR] [--debug-console] [--channel auto|vsock|serial|tcp]
                         [--foreground] [--timeout S]
    python3 qemu/boot.py --stop          # stop the guest named in the address file
    python3 qemu/boot.py --status        # print the address file
    python3 qemu/boot.py --template      # make the template that later boots start from
    python3 qemu/boot.py --cold          # boot from scratch even when a template is there

The agent's channel: vsock where this host has /dev/vhost-vsock, else a virtio-serial port behind
a 0600 unix socket in the guest's run directory (the address is then serial:///.../agent.sock).
--channel tcp forwards the agent's TCP port to 127.0.0.1 instead, for tools that need TCP.

A template (qemu/template.py) is one guest booted to "agent ready" and saved: its RAM in a file on
tmpfs and its device state (default $KATA_TEMPLATE_DIR or /dev/shm/kata-agent-py/templates/
ARCH-MACHINE). A boot with the same settings then starts from it in well under a second; with
other settings, or another image or QEMU, it boots from scratch and says why. --share/virtio-fs
with a template needs --machine q35 (the device is hot-plugged after the restore).

By default the guest keeps running in the background and its address file (JSON: addr, pid, qmp,
shared_dir, console_log, ...) is written to $XDG_RUNTIME_DIR/kata-agent-py/guest.json or
/tmp/kata-agent-py/guest.json, where kata-agent-ctl finds it. With --foreground the script waits
for the guest to exit (Ctrl-C stops it). Exit status 0 once the agent answered; 1 on boot failure
(the console tail is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qemu.template import Template, TemplateError, default_template_dir, make_template  # noqa: E402
from qemu.vm import BootError, Guest, default_addr_file, host_arch, stop_from_addr_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=host_arch(), choices=["x86_64", "aarch64"])
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--machine", default=None, help="x86_64: microvm (default), q35, pc; aarch64: virt")
    p.add_argument("--cpu", default=None)
    p.add_argument("--memory", default="")
    p.add_argument("--smp", type=int, default=0)
    p.add_argument("--image", type=Path, default=None, help="guest image dir (has manifest.json)")
    p.add_argument("--share", type=Path, default=None, help="host dir shared over virtio-fs (tag kataShared)")
    p.add_argument("--no-virtiofs", action="store_true")
    p.add_argument("--debug-console", action="store_true", help="shell on the serial console")
    p.add_argument("--channel", default="auto", choices=["auto", "vsock", "serial", "tcp"],
                   help="the agent's channel (default: vsock if /dev/vhost-vsock exists, else serial)")
    p.add_argument("--cmdline", default="", help="extra kernel command line")
    p.add_argument("--timeout", type=float, default=120.0, help="boot timeout, seconds")
    p.add_argument("--addr-file", type=Path, default=default_addr_file())
    p.add_argument("--foreground", action="store_true", help="wait for the guest; Ctrl-C stops it")
    p.add_argument("--stop", action="store_true", help="stop the guest of the address file")
    p.add_argument("--status", action="store_true", help="print the address file")
    p.add_argument("--template", action="store_true", help="make the template for these settings, then exit")
    p.add_argument("--template-dir", type=Path, default=None, help="where the template lives")
    p.add_argument("--cold", action="store_true", help="do not start from a template")
    a = p.parse_args(argv)

    if a.stop:
        ok = stop_from_addr_file(a.addr_file)
        print("stopped" if ok else f"no guest recorded in {a.addr_file}")
        return 0
    if a.status:
        if not a.addr_file.exists():
            print(f"no guest recorded in {a.addr_file}", file=sys.stderr)
            return 1
        print(a.addr_file.read_text().strip())
        return 0
    if a.addr_file.exists():
        try:
            old = json.loads(a.addr_file.read_text())
            if old.get("pid") and os.path.exists(f"/proc/{old['pid']}"):
                print(f"a guest is already running (pid {old['pid']}, {old.get('addr')}); "
                      f"stop it with --stop", file=sys.stderr)
                return 1
        except (OSError, ValueError):
            pass

    def guest(**extra) -> Guest:
        return Guest(arch=a.arch, accel=a.accel, machine=a.machine, cpu=a.cpu, memory=a.memory, smp=a.smp,
                     image=a.image, share_dir=a.share, debug_console=a.debug_console, cmdline=a.cmdline,
                     channel=a.channel,
                     boot_timeout=a.timeout, **extra)

    tdir = a.template_dir or default_template_dir(a.arch, a.machine)
    if a.template:
        try:
            tpl = make_template(guest(name="template"), tdir)
        except (BootError, TemplateError) as e:
            print(f"template failed: {e}", file=sys.stderr)
            return 1
        m = tpl.manifest()
        print(f"template {tdir}: booted in {m['boot_seconds']:.2f}s, device state {m['state_bytes']} bytes, "
              f"RAM {m['memory_resident_bytes'] / 1e6:.0f} MB in {tpl.memory}", file=sys.stderr)
        return 0
    virtiofs = False if a.no_virtiofs else None
    template = None
    if not a.cold and Template(tdir).exists():
        probe = guest(virtiofs=virtiofs)
        try:
            Template(tdir).check(probe, Template(tdir).manifest().get("accel", ""))
            template = tdir
            virtiofs = True if a.share and not a.no_virtiofs else False
        except (BootError, TemplateError) as e:
            print(f"not starting from the template: {e}", file=sys.stderr)
    g = guest(virtiofs=virtiofs, template=template, addr_file=a.addr_file)
    try:
        g.start()
    except BootError as e:
        print(f"boot failed: {e}", file=sys.stderr)
        return 1
    info = g.info()
    how = f"restored from {template}" if g.restored else "booted"
    print(f"agent ready at {g.addr} after {g.boot_seconds:.2f}s ({how}, {a.arch}, {g.used_accel}); "
          f"console {info['console_log']}; qmp {info['qmp']}; "
          f"shared {info['shared_dir'] if info['share_tag'] else 'none'}", file=sys.stderr)
    print(g.addr, flush=True)
    if not a.foreground:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        g.wait()
    except KeyboardInterrupt:
        pass
    finally:
        g.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
