#!/usr/bin/env bash
# Build the guest: Debian's cloud kernel + an initramfs with python3, the agent's wheels and the
# agent itself (PID 1).
#
#   bash guest-image/build.sh [--arch x86_64|aarch64] [--out DIR] [--compress none|gzip|zstd|lz4]
#                             [--rebuild-base] [--agent-only]
#
# Output (default guest-image/out/<arch>/, or $KATA_GUEST_OUT/<arch>/):
#   vmlinuz            the kernel as Debian ships it (bzImage / arm64 Image)
#   vmlinux            x86_64 only: the decompressed ELF (PVH entry), boots ~0.4 s faster under TCG
#   base.cpio[.EXT]    Debian userland, kernel modules, wheels, precompiled .pyc (slow, cached)
#   agent.cpio[.EXT]   /init and the agent package (rebuilt in ~1 s when agent/ changes)
#   initrd.img         base + agent concatenated (Linux unpacks concatenated cpio archives)
#   manifest.json      kernel version, file names and sizes; qemu/ reads it
#
# The base layer is rebuilt only when its inputs change (this script, requirements.txt,
# modules.txt, the arch). Outputs are reproducible: fixed SOURCE_DATE_EPOCH, sorted cpio,
# --reproducible inode numbers, hash-based .pyc compiled with PYTHONHASHSEED=0.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
ARCH=$(uname -m)
OUT_ROOT=${KATA_GUEST_OUT:-$HERE/out}
COMPRESS=none
REBUILD_BASE=0
AGENT_ONLY=0
SUITE=bookworm
MIRROR=${KATA_GUEST_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${KATA_GUEST_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}   # 2024-01-01, fixed for reproducibility
PYVER=3.11

while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#*=}; shift ;;
    --out) OUT_ROOT=$2; shift 2 ;;
    --out=*) OUT_ROOT=${1#*=}; shift ;;
    --compress) COMPRESS=$2; shift 2 ;;
    --compress=*) COMPRESS=${1#*=}; shift ;;
    --rebuild-base) REBUILD_BASE=1; shift ;;
    --agent-only) AGENT_ONLY=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

case "$ARCH" in
  x86_64|amd64) ARCH=x86_64; DEBARCH=amd64; PYPLAT=x86_64 ;;
  aarch64|arm64) ARCH=aarch64; DEBARCH=arm64; PYPLAT=aarch64 ;;
  *) echo "unsupported arch: $ARCH" >&2; exit 2 ;;
esac
case "$COMPRESS" in none|gzip|zstd|lz4) ;; *) echo "bad --compress: $COMPRESS" >&2; exit 2 ;; esac

OUT=$OUT_ROOT/$ARCH
WORK=$OUT/work
mkdir -p "$OUT" "$WORK"
T0=$(date +%s.%N)
step() { printf '\033[1m==> [%5.1fs] %s\033[0m\n' "$(echo "$(date +%s.%N) - $T0" | bc)" "$*" >&2; }
human() { numfmt --to=iec --suffix=B "$1"; }

if [ "$(id -u)" != 0 ]; then
  echo "build.sh must run as root (mmdebstrap keeps file owners; nothing is mounted)" >&2
  exit 1
fi

# ---------------------------------------------------------------- host tools
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v cpio >/dev/null || need+=(cpio)
command -v depmod >/dev/null || need+=(kmod)
command -v lz4 >/dev/null || need+=(lz4)
command -v zstd >/dev/null || need+=(zstd)
command -v bc >/dev/null || need+=(bc)
command -v dpkg-deb >/dev/null || need+=(dpkg)
[ -x /usr/bin/python3.11 ] || command -v python3.11 >/dev/null || need+=(python3.11)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing host tools: ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
# A python3.11 for pip downloads and .pyc compilation (bytecode is the same on every arch).
HOSTPY=$(command -v /usr/bin/python3.11 || command -v python3.11)
if ! "$HOSTPY" -m pip --version >/dev/null 2>&1; then
  PIPPY=$(command -v python3)
else
  PIPPY=$HOSTPY
fi

# ---------------------------------------------------------------- base layer
BASE_KEY=$( { cat "$0" "$HERE/requirements.txt" "$HERE/modules.txt"; echo "$ARCH $SUITE $COMPRESS"; } | sha256sum | cut -c1-16)
EXT=""; case "$COMPRESS" in gzip) EXT=.gz ;; zstd) EXT=.zst ;; lz4) EXT=.lz4 ;; esac
compress() {  # stdin -> stdout
  case "$COMPRESS" in
    none) cat ;;
    gzip) gzip -9n ;;
    zstd) zstd -q -19 -T0 ;;
    lz4) lz4 -l -9 -q ;;          # the kernel wants the legacy lz4 frame
  esac
}
mkcpio() {  # $1 = tree, stdout = newc archive, sorted, clamped mtimes, inode numbers from 1
  ( cd "$1" && find . -mindepth 1 -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} + &&
    find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
    cpio --quiet -o -H newc --reproducible )
}

build_base() {
  local tree=$WORK/rootfs kdir=$WORK/kernel
  rm -rf "$tree" "$kdir"; mkdir -p "$kdir/debs"

  step "mmdebstrap ($SUITE, $DEBARCH, extract variant: no maintainer scripts run, so no binfmt needed)"
  # The extract variant only unpacks and runs only extract hooks; the hook uses mmdebstrap's own apt set-up (for the
  # guest's arch) to download the versioned kernel package that linux-image-cloud-ARCH points to.
  mmdebstrap --variant=extract --arch="$DEBARCH" --mode=root \
    --include=python3,busybox-static,kmod,iproute2,libpython3.11-stdlib,libstdc++6,ca-certificates,libseccomp2 \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --extract-hook="$HERE/fetch-kernel.sh \"\$1\" $DEBARCH $kdir/debs" \
    "$SUITE" "$tree" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main" </dev/null

  step "kernel: unpack $(basename "$kdir"/debs/linux-image-*.deb)"
  dpkg-deb -x "$kdir"/debs/linux-image-*.deb "$kdir/pkg"
  local kver; kver=$(ls "$kdir/pkg/lib/modules")
  echo "$kver" > "$OUT/kernel.version"
  cp "$kdir/pkg/boot/vmlinuz-$kver" "$OUT/vmlinuz"
  rm -f "$OUT/vmlinux"
  if [ "$ARCH" = x86_64 ]; then
    # bzImage payload is LZ4 (legacy frame, magic 02 21 4c 18): decompress to the ELF vmlinux.
    local off
    off=$(grep -obUaP '\x02\x21\x4c\x18' "$OUT/vmlinuz" | head -1 | cut -d: -f1)
    if [ -n "$off" ]; then
      tail -c +$((off + 1)) "$OUT/vmlinuz" | lz4 -dc 2>/dev/null > "$OUT/vmlinux.tmp" || true
      if [ "$(head -c4 "$OUT/vmlinux.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
        mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
      else
        rm -f "$OUT/vmlinux.tmp"; echo "warning: could not extract vmlinux ELF; vmlinuz only" >&2
      fi
    fi
  fi

  step "kernel modules: $(grep -cv '^#' "$HERE/modules.txt") wanted + dependencies, depmod"
  depmod -b "$kdir/pkg" "$kver"
  local mdir=$tree/lib/modules/$kver
  rm -rf "$tree/lib/modules"; mkdir -p "$mdir"
  cp "$kdir/pkg/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} "$mdir/" 2>/dev/null || true
  "$HOSTPY" - "$kdir/pkg/lib/modules/$kver" "$mdir" "$HERE/modules.txt" <<'EOF'
import os, shutil, sys
src, dst, listfile = sys.argv[1:4]
dep = {}
for line in open(os.path.join(src, "modules.dep")):
    path, _, deps = line.partition(":")
    dep[path] = deps.split()
byname = {}
for path in dep:
    name = os.path.basename(path).split(".ko")[0]
    byname[name] = path
    byname[name.replace("-", "_")] = path
want = [l.strip() for l in open(listfile) if l.strip() and not l.startswith("#")]
todo, seen = [byname[w] for w in want if w in byname], set()
missing = [w for w in want if w not in byname]
while todo:
    p = todo.pop()
    if p in seen:
        continue
    seen.add(p)
    todo.extend(dep.get(p, []))
for p in sorted(seen):
    os.makedirs(os.path.dirname(os.path.join(dst, p)), exist_ok=True)
    shutil.copy2(os.path.join(src, p), os.path.join(dst, p))
print(f"    {len(seen)} modules copied; built in or absent: {', '.join(missing) or '-'}", file=sys.stderr)
EOF
  depmod -b "$tree" "$kver"

  step "python wheels for $PYPLAT (cp311, manylinux) from PyPI"
  local wheels=$OUT/wheels
  mkdir -p "$wheels"
  local plat=(--platform "manylinux2014_$PYPLAT" --platform "manylinux_2_17_$PYPLAT"
              --platform "manylinux_2_28_$PYPLAT" --platform "manylinux_2_34_$PYPLAT")
  env -u PIP_REQUIRE_VIRTUALENV "$PIPPY" -m pip download -q --disable-pip-version-check \
    --only-binary=:all: "${plat[@]}" --python-version 3.11 --implementation cp --abi cp311 \
    -d "$wheels" -r "$HERE/requirements.txt"
  local site=$tree/usr/local/lib/python$PYVER/dist-packages
  mkdir -p "$site"
  # Install exactly what was resolved for this requirements file (the wheels dir may hold more).
  env -u PIP_REQUIRE_VIRTUALENV "$PIPPY" -m pip install -q --disable-pip-version-check --no-deps \
    --no-index --find-links "$wheels" --only-binary=:all: "${plat[@]}" --python-version 3.11 \
    --implementation cp --abi cp311 --no-compile --target "$site" \
    $(cd "$wheels" && ls *.whl | sed 's/-.*//' | sort -u)
  rm -rf "$site/bin" "$site"/*.dist-info/RECORD
  find "$site" -name '*.so' -exec strip --strip-unneeded {} + 2>/dev/null || true

  step "rootfs: busybox applets, /etc, pruning"
  # /bin/sh and the applets that the extract variant lacks (never shadowing a real tool).
  local applets
  if busybox --list >/dev/null 2>&1; then applets=$(busybox --list)
  else applets=$("$tree/bin/busybox" --list); fi
  for a in $applets; do
    case "$a" in busybox|init|linuxrc|reboot|poweroff|halt) continue ;; esac
    if [ ! -e "$tree/bin/$a" ] && [ ! -e "$tree/usr/bin/$a" ] && [ ! -e "$tree/sbin/$a" ] \
       && [ ! -e "$tree/usr/sbin/$a" ] && [ ! -L "$tree/bin/$a" ] && [ ! -L "$tree/sbin/$a" ]; then
      ln -s /bin/busybox "$tree/usr/local/bin/$a" 2>/dev/null || { mkdir -p "$tree/usr/local/bin"; ln -s /bin/busybox "$tree/usr/local/bin/$a"; }
    fi
  done
  [ -e "$tree/bin/sh" ] || ln -s busybox "$tree/bin/sh"
  for t in modprobe insmod rmmod lsmod depmod modinfo; do
    [ -e "$tree/sbin/$t" ] || ln -s /bin/kmod "$tree/sbin/$t"
  done
  mkdir -p "$tree/etc" "$tree/root" "$tree/proc" "$tree/sys" "$tree/dev" "$tree/run" "$tree/tmp" \
           "$tree/mnt" "$tree/var/tmp" "$tree/usr/lib/kata-agent"
  chmod 1777 "$tree/tmp" "$tree/var/tmp"
  [ -s "$tree/etc/passwd" ] || printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' > "$tree/etc/passwd"
  [ -s "$tree/etc/group" ] || printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' > "$tree/etc/group"
  echo kata-guest > "$tree/etc/hostname"
  printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$tree/etc/hosts"
  : > "$tree/etc/resolv.conf"
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$tree/etc/nsswitch.conf"
  : > "$tree/etc/fstab"
  rm -rf "$tree/boot" "$tree/var/cache/apt" "$tree/var/lib/apt/lists" "$tree/usr/share/doc" \
         "$tree/usr/share/man" "$tree/usr/share/locale" "$tree/usr/share/info" \
         "$tree/usr/share/lintian" "$tree/usr/share/bug" "$tree/var/log"/* \
         "$tree/usr/lib/python$PYVER"/{ensurepip,idlelib,tkinter,turtledemo,lib2to3,pydoc_data,test} \
         "$tree/usr/share/python3/debian_defaults" 2>/dev/null || true
  # glibc's iconv modules (Python has its own codecs) and the openssl tool (ca-certificates needs it
  # only in its maintainer script): 9 MB that every boot unpacks.
  rm -rf "$tree/usr/lib/$PYPLAT-linux-gnu/gconv" "$tree/usr/bin/openssl"
  mkdir -p "$tree/var/log"
  find "$tree" -name __pycache__ -prune -exec rm -rf {} +
  # ld.so.cache speeds up every dynamic link; the host ldconfig handles the same arch only.
  if [ "$ARCH" = "$(uname -m)" ]; then ldconfig -r "$tree" 2>/dev/null || true; fi
  rm -rf "$tree/var/cache/ldconfig"   # aux-cache holds inode numbers and ctimes: not reproducible

  step "compile .pyc in place of the sources (clean env, reproducible)"
  # Sourceless: each module's .pyc beside where its .py was (-b), and the .py removed: 13 MB less to
  # unpack at every boot, and no source to stat. Tracebacks from the standard library and the wheels
  # show file and line, without the line's text; the agent's own layer keeps its sources.
  local pydirs=("$tree/usr/lib/python$PYVER" "$tree/usr/lib/python3/dist-packages" "$site")
  env -i PYTHONHASHSEED=0 SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" PATH=/usr/bin:/bin "$HOSTPY" \
    -m compileall -q -j0 -b --invalidation-mode unchecked-hash -s "$tree" -p / "${pydirs[@]}" >/dev/null || true
  find "${pydirs[@]}" -name '*.py' -exec sh -c 'for f; do if [ -f "${f}c" ]; then rm "$f"; fi; done' sh {} +

  step "pack base.cpio$EXT"
  mkcpio "$tree" | compress > "$OUT/base.cpio$EXT.tmp"
  mv "$OUT/base.cpio$EXT.tmp" "$OUT/base.cpio$EXT"
  echo "$BASE_KEY" > "$OUT/base.key"
  echo "    rootfs tree $(du -sh "$tree" | cut -f1), base.cpio$EXT $(human "$(stat -c %s "$OUT/base.cpio$EXT")")" >&2
}

if [ "$AGENT_ONLY" = 1 ] && [ -f "$OUT/base.cpio$EXT" ]; then
  :
elif [ "$REBUILD_BASE" = 1 ] || [ ! -f "$OUT/base.cpio$EXT" ] || [ "$(cat "$OUT/base.key" 2>/dev/null)" != "$BASE_KEY" ]; then
  build_base
else
  step "base layer up to date ($BASE_KEY): $(human "$(stat -c %s "$OUT/base.cpio$EXT")")"
fi

# ---------------------------------------------------------------- agent layer
step "agent layer: /init + agent/ from $REPO"
AT=$WORK/agent-tree
rm -rf "$AT"; mkdir -p "$AT/usr/lib/kata-agent"
install -m 0755 "$HERE/init" "$AT/init"
install -m 0644 "$HERE/stub_agent.py" "$AT/usr/lib/kata-agent/stub_agent.py"
if [ -d "$REPO/agent" ]; then
  # Copy tracked and untracked-but-not-ignored files only, never __pycache__ or editor junk.
  (cd "$REPO" && find agent -type f \( -name '*.py' -o -name '*.pyi' -o -name '*.json' -o -name '*.typed' \) \
      -not -path '*/__pycache__/*' | LC_ALL=C sort) |
    while read -r f; do install -D -m 0644 "$REPO/$f" "$AT/usr/lib/kata-agent/$f"; done
fi
env -i PYTHONHASHSEED=0 SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" PATH=/usr/bin:/bin "$HOSTPY" \
  -m compileall -q --invalidation-mode unchecked-hash -s "$AT" -p / "$AT/usr/lib/kata-agent" >/dev/null || true
mkcpio "$AT" | compress > "$OUT/agent.cpio$EXT"

cat "$OUT/base.cpio$EXT" "$OUT/agent.cpio$EXT" > "$OUT/initrd.img.tmp"
mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"

KVER=$(cat "$OUT/kernel.version")
KERNEL=vmlinuz; [ -f "$OUT/vmlinux" ] && KERNEL=vmlinux
"$HOSTPY" - "$OUT" "$ARCH" "$KVER" "$KERNEL" "$COMPRESS" "$BASE_KEY" <<'EOF'
import json, os, sys, hashlib
out, arch, kver, kernel, comp, key = sys.argv[1:7]
def info(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"path": p, "size": os.path.getsize(p), "sha256": h.hexdigest()}
m = {
    "arch": arch, "kernel_version": kver, "compression": comp, "base_key": key,
    "kernel": info(kernel), "vmlinuz": info("vmlinuz"), "initrd": info("initrd.img"),
    "console": "ttyS0" if arch == "x86_64" else "ttyAMA0",
}
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(m, f, indent=2, sort_keys=True)
EOF
step "done: $OUT"
printf '    kernel  %s (%s)  %s\n' "$OUT/$KERNEL" "$KVER" "$(human "$(stat -c %s "$OUT/$KERNEL")")"
printf '    initrd  %s  %s (base %s + agent %s, compression %s)\n' "$OUT/initrd.img" \
  "$(human "$(stat -c %s "$OUT/initrd.img")")" "$(human "$(stat -c %s "$OUT/base.cpio$EXT")")" \
  "$(human "$(stat -c %s "$OUT/agent.cpio$EXT")")" "$COMPRESS"
printf '    sha256  %s\n' "$(sha256sum "$OUT/initrd.img" | cut -c1-16)"
