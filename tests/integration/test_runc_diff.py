"""Differential tests: the same config.json under Debian's runc and under the agent must give the
container the same view of itself (ids, caps, NoNewPrivs, rlimits, env, cwd, hostname, mounts, /dev,
namespaces, the flags of each cgroup mount, and which cgroups are the container's own, the v1
name=systemd one included; whether its user can reopen its stdout). With a user namespace, also
the maps and the owners in /dev."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from kata_agent_client.spec import default_config
from tests.integration.test_containers import run
from tests.integration.test_userns import MAPS, mapped_dir, mapped_rootfs  # noqa: F401 - fixtures

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")]

# Each probe prints one section; the outputs are compared section by section.
VIEW = r"""
echo "== ids"; id
echo "== status"; grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status
echo "== rlimits"; ulimit -a
echo "== env"; env | sort
echo "== cwd"; pwd
echo "== hostname"; hostname
echo "== mounts"; awk '{ split($0, a, " - "); split(a[2], b, " "); print $5, b[1] }' /proc/self/mountinfo
echo "== cgroup mount flags"; awk '$5 ~ /^\/sys\/fs\/cgroup/ { print $5, $6 }' /proc/self/mountinfo
echo "== dev"; ls -l /dev | awk '{ print substr($1, 1, 1), $1, $3, $4, $9, $10, $11 }' | sort
echo "== ns"; ls /proc/self/ns
echo "== umask"; umask
echo "== own cgroups"; awk -F: '{ print $2, ($3 == "/" ? "the whole hierarchy" : "its own") }' /proc/self/cgroup | sort
echo "== stdout"; echo reopened > /dev/stdout
echo "== name=systemd shows"; find /sys/fs/cgroup/systemd -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l
"""


def sections(text: str) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("== "):
            current = line[3:]
            out[current] = []
        elif current is not None:
            out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def runc_view(tmp_path, cfg) -> str:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps(cfg))
    state = tmp_path / "runc-state"
    # A private mount namespace, so nothing runc mounts can leak; its state lives under tmp_path.
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "runc", "--root", str(state),
                           "run", "--bundle", str(bundle), f"diff-{tmp_path.name[-20:]}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


USERNS_VIEW = r"""
echo "== uid_map"; cat /proc/self/uid_map
echo "== gid_map"; cat /proc/self/gid_map
echo "== owners"; ls -ln / /dev /dev/pts /dev/shm /dev/mqueue | awk '{ print $1, $3, $4, $9 }'
"""


def compare(agent, tmp_path, rootfs, container_id, adjust=None, extra=""):
    cfg = default_config(["sh", "-c", VIEW + extra], rootfs=str(rootfs))
    cfg["root"]["readonly"] = True
    if adjust:
        adjust(cfg)
    status, ours, err = run(agent, container_id, cfg)
    assert status == 0, err
    theirs = sections(runc_view(tmp_path, cfg))
    ours_s = sections(ours)
    assert ours_s.keys() == theirs.keys()
    for key in theirs:
        assert ours_s[key] == theirs[key], f"section {key} differs:\n--- agent\n{ours_s[key]}\n--- runc\n{theirs[key]}"


def test_default_config_matches_runc(agent, busybox_rootfs, container_id, tmp_path):
    compare(agent, tmp_path, busybox_rootfs, container_id)


def test_non_root_user_matches_runc(agent, busybox_rootfs, container_id, tmp_path):
    def adjust(cfg):
        cfg["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [100, 2000]}
        cfg["process"]["cwd"] = "/tmp"
        cfg["process"]["env"].append("FOO=bar")
        cfg["process"]["rlimits"].append({"type": "RLIMIT_CORE", "hard": 4096, "soft": 1024})
        caps = cfg["process"]["capabilities"]
        caps["inheritable"] = list(caps["bounding"])
        cfg["hostname"] = "diffhost"

    compare(agent, tmp_path, busybox_rootfs, container_id, adjust)


def test_seccomp_and_no_new_privs_match_runc(agent, busybox_rootfs, container_id, tmp_path):
    def adjust(cfg):
        cfg["process"]["noNewPrivileges"] = True
        cfg["linux"]["seccomp"] = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                                   "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]}

    compare(agent, tmp_path, busybox_rootfs, container_id, adjust)


def test_user_namespace_matches_runc(agent, mapped_rootfs, container_id, tmp_path):
    """Container 0 -> host 100000 (65536 ids) on a root owned by that range: the maps, ids, mounts
    (devices bound from the host, sysfs of the container's own network namespace) and the owners
    of /dev's entries as runc gives them."""
    def adjust(cfg):
        cfg["linux"]["namespaces"].append({"type": "user"})
        cfg["linux"].update({k: [dict(m) for m in v] for k, v in MAPS.items()})

    compare(agent, tmp_path, mapped_rootfs, container_id, adjust, extra=USERNS_VIEW)


def test_user_namespace_with_extents_and_a_user_matches_runc(agent, mapped_rootfs, container_id, tmp_path):
    """Three extents (root, the users' ids, the rest shifted elsewhere) and a process user with
    groups: the same maps, ids and owners under both."""
    def adjust(cfg):
        cfg["linux"]["namespaces"].append({"type": "user"})
        extents = [{"containerID": 0, "hostID": 100000, "size": 1000},
                   {"containerID": 1000, "hostID": 101000, "size": 1001},
                   {"containerID": 2001, "hostID": 300000, "size": 63535}]
        cfg["linux"]["uidMappings"] = [dict(m) for m in extents]
        cfg["linux"]["gidMappings"] = [dict(m) for m in extents]
        cfg["process"]["user"] = {"uid": 1000, "gid": 1000, "additionalGids": [100, 2000]}

    compare(agent, tmp_path, mapped_rootfs, container_id, adjust, extra=USERNS_VIEW)
