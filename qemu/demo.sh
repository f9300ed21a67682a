#!/usr/bin/env bash
# One command: boot the guest under QEMU and run a busybox container in it through the agent.
#
#   bash qemu/demo.sh [--arch x86_64|aarch64] [--keep]
#
# 1. installs what is missing (apt: qemu, the image build tools, busybox-static; pip: .venv + project)
# 2. builds the guest image the first time (refreshes the agent layer, ~1 s, every time)
# 3. boots the guest (KVM when it works, else TCG) and waits for the agent's Health.Check
# 4. runs a busybox container: `ps -ef` (itself as PID 1), hostname, /etc/resolv.conf
# 5. starts a second one detached, execs into it, kills it (SIGKILL -> 137) and removes it
# 6. DestroySandbox, shuts the VM down, prints timings
#
# Non-interactive (no stdin needed). Everything it starts lives in a private temp directory (its
# own XDG_RUNTIME_DIR, so a guest you already run is left alone) and is stopped on exit.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ARCH=$(uname -m)
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#*=}; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

if [ -t 1 ]; then B=$'\033[1m'; D=$'\033[2m'; G=$'\033[32m'; R=$'\033[31m'; N=$'\033[0m'
else B=; D=; G=; R=; N=; fi
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
T_ALL=$(now)
step() { printf '\n%s==> %s%s\n' "$B" "$*" "$N"; }
show() { printf '%s$ %s%s\n' "$D" "$*" "$N"; }
die() { printf '%sdemo failed: %s%s\n' "$R" "$*" "$N" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
  die "run as root (the image build keeps file owners; apt installs what is missing)"
fi

# ------------------------------------------------------------------ 1. dependencies
step "1/6 checking dependencies"
QEMU_PKG=qemu-system-x86; [ "$ARCH" = aarch64 ] && QEMU_PKG=qemu-system-arm
want=("$QEMU_PKG" qemu-system-common mmdebstrap busybox-static cpio kmod lz4 zstd bc python3-venv
      python3-pip)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "    apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "    apt packages present: ${want[*]}"
fi
VENV=$REPO/.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "    creating $VENV"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import agent, kata_agent_client, grpc" 2>/dev/null \
   || [ ! -x "$VENV/bin/kata-agent-ctl" ]; then
  echo "    pip install -e $REPO"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$REPO"
else
  echo "    python project installed in $VENV"
fi
PY=$VENV/bin/python
CTL=$VENV/bin/kata-agent-ctl

# ------------------------------------------------------------------ 2. image
step "2/6 guest image ($ARCH)"
T=$(now)
OUT=${KATA_GUEST_OUT:-$REPO/guest-image/out}/$ARCH
if [ -f "$OUT/manifest.json" ]; then
  bash "$REPO/guest-image/build.sh" --arch "$ARCH" --agent-only 2>&1 | sed 's/^/    /' | grep -E 'kernel |initrd ' || true
else
  echo "    first build: Debian cloud kernel + python3 + agent initramfs (a few minutes)"
  bash "$REPO/guest-image/build.sh" --arch "$ARCH" 2>&1 | sed 's/^/    /'
fi
T_IMAGE=$(since "$T")

# ------------------------------------------------------------------ 3. boot
WORK=$(mktemp -d /tmp/kata-demo.XXXXXX)
export XDG_RUNTIME_DIR=$WORK/run          # our own guest.json: kata-agent-ctl finds this guest
mkdir -p "$XDG_RUNTIME_DIR"
cleanup() {
  local rc=$?
  if [ "$KEEP" = 1 ] && [ $rc = 0 ]; then
    echo "    --keep: guest still running; XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR $PY $REPO/qemu/boot.py --stop"
    return
  fi
  if [ $rc != 0 ] && [ -n "${INFO:-}" ] && [ -f "$INFO" ]; then
    local log; log=$(field console_log 2>/dev/null || true)
    if [ -n "$log" ] && [ -f "$log" ]; then
      echo "    last lines of the guest console ($log):" >&2
      tail -n 8 "$log" | cut -c1-400 | sed 's/^/    | /' >&2
    fi
  fi
  "$PY" "$REPO/qemu/boot.py" --stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
  [ $rc = 0 ] || printf '%sdemo failed (exit %s)%s\n' "$R" "$rc" "$N" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step "3/6 booting the guest (QEMU, user networking with restrict=on)"
show "python3 qemu/boot.py --arch $ARCH"
T=$(now)
if ! ADDR=$("$PY" "$REPO/qemu/boot.py" --arch "$ARCH" 2>"$WORK/boot.err"); then
  cat "$WORK/boot.err" >&2; die "the guest did not boot"
fi
T_BOOT_WALL=$(since "$T")
INFO=$XDG_RUNTIME_DIR/kata-agent-py/guest.json
field() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$INFO" "$1"; }
T_BOOT=$(field boot_seconds); ACCEL=$(field accel); QPID=$(field pid)
echo "    agent ready at $ADDR after ${T_BOOT}s ($ACCEL, qemu pid $QPID)"
show "kata-agent-ctl version"
"$CTL" version | sed 's/^/    /'

# ------------------------------------------------------------------ 4. a container
step "4/6 a busybox container: PID 1, hostname, DNS"
if [ "$ARCH" != "$(uname -m)" ]; then  # the guest's own static busybox, from the image build tree
  export BUSYBOX=$OUT/work/rootfs/bin/busybox
  [ -x "$BUSYBOX" ] || die "no $ARCH busybox at $BUSYBOX (rebuild: bash guest-image/build.sh --arch $ARCH --rebuild-base)"
fi
"$PY" -m kata_agent_client.bundle --hostname demo-box "$WORK/bundle" -- sh /demo.sh >/dev/null
cat > "$WORK/bundle/rootfs/demo.sh" <<'EOF'
echo "ps -ef:"; ps -ef
echo "hostname: $(hostname)"
echo "/etc/resolv.conf:"; cat /etc/resolv.conf
EOF
echo "    bundle: $WORK/bundle (busybox-static, $(ls "$WORK/bundle/rootfs/bin" | wc -l) applets in /bin), runs /demo.sh:"
sed 's/^/    > /' "$WORK/bundle/rootfs/demo.sh"
show "kata-agent-ctl run --rm --dns 'nameserver 10.0.2.3' --bundle BUNDLE demo-run"
T=$(now)
set +e
"$CTL" run --rm --dns 'nameserver 10.0.2.3' --bundle "$WORK/bundle" demo-run </dev/null | sed 's/^/    | /'
RC=${PIPESTATUS[0]}
set -e
T_RUN=$(since "$T")
[ "$RC" = 0 ] || die "the container exited with $RC"
printf '    %sexit 0 in %.2fs%s (CreateSandbox + copy rootfs + CreateContainer + Start + Wait + Remove)\n' "$G" "$T_RUN" "$N"

# ------------------------------------------------------------------ 5. exec
step "5/6 exec into a running container"
"$PY" -m kata_agent_client.bundle --hostname demo-box "$WORK/sleeper" -- sleep 600 >/dev/null
show "kata-agent-ctl run -d --bundle BUNDLE2 demo-exec      # runs: sleep 600"
T=$(now)
"$CTL" run -d --bundle "$WORK/sleeper" demo-exec </dev/null >/dev/null
T_START=$(since "$T")
show "kata-agent-ctl exec demo-exec -- sh -c '...'"
T=$(now)
"$CTL" exec demo-exec -- sh -c 'echo "exec: pid $$ in $(hostname)"; ps' </dev/null | sed 's/^/    | /'
T_EXEC=$(since "$T")
show "kata-agent-ctl kill demo-exec KILL; kata-agent-ctl wait demo-exec"
"$CTL" kill demo-exec KILL
STATUS=$("$CTL" wait demo-exec)
echo "    exit status $STATUS (128 + SIGKILL)"
[ "$STATUS" = 137 ] || die "expected 137 after SIGKILL, got $STATUS"
show "kata-agent-ctl delete demo-exec"
"$CTL" delete demo-exec

# ------------------------------------------------------------------ 6. teardown
step "6/6 teardown"
show "kata-agent-ctl destroy-sandbox"
"$CTL" destroy-sandbox
show "python3 qemu/boot.py --stop      # QMP quit, as Kata's runtime stops its VM"
T=$(now)
if [ "$KEEP" = 1 ]; then
  T_STOP=0
else
  "$PY" "$REPO/qemu/boot.py" --stop >/dev/null
  T_STOP=$(since "$T")
  if [ -d "/proc/$QPID" ] && grep -q qemu "/proc/$QPID/cmdline" 2>/dev/null; then die "qemu (pid $QPID) still runs"; fi
  echo "    qemu (pid $QPID) exited"
fi

printf '\n%s==> timings%s\n' "$B" "$N"
printf '    %-44s %6.2f s\n' "image (agent layer refresh or first build)" "$T_IMAGE" \
  "boot: QEMU start -> agent Health.Check ($ACCEL)" "$T_BOOT" \
  "boot.py wall time" "$T_BOOT_WALL" \
  "container run (ps/hostname/resolv.conf)" "$T_RUN" \
  "start detached container" "$T_START" \
  "exec into it" "$T_EXEC" \
  "VM shutdown" "$T_STOP" \
  "total" "$(since "$T_ALL")"
printf '%sdemo ok%s\n' "$G" "$N"
