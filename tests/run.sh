#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine, then run it.
#   bash tests/run.sh                 # unit + integration (root) + VM tests
#   bash tests/run.sh -m "not vm"     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(runc crun busybox-static iproute2 iptables kmod e2fsprogs util-linux
              qemu-system-x86 qemu-system-arm qemu-utils mmdebstrap cpio zstd libseccomp2 tmux
              golang-go golang-github-containerd-ttrpc-dev containerd)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import agent, kata_agent_client, grpc_tools, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
    echo "== installing the project and its test dependencies"
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
    touch .venv/.installed
fi

echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
    echo "pytest collected no tests" >&2
fi
exit $rc
