"""Linux.Seccomp through libseccomp (libseccomp.so.2, Debian package ``libseccomp2``) by ctypes.

Names and numbers here are pure data, used by agent.oci to validate and convert a spec. The
container's child builds the filter (``build``) while it can still report an error at create,
and loads it (``load``) where runc does: before dropping privileges when NoNewPrivileges is
off (loading then needs CAP_SYS_ADMIN), else as late as possible, just before exec.
The spawner calls ``preload()`` so that the library is mapped before any pivot_root.
"""

from __future__ import annotations

import ctypes
import errno
import re
from typing import Any

ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000, "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000, "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000, "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000, "SCMP_ACT_ALLOW": 0x7FFF0000,
}
WITH_DATA = ("SCMP_ACT_ERRNO", "SCMP_ACT_TRACE")  # the low 16 bits carry errnoRet
OPERATORS = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4,
             "SCMP_CMP_GE": 5, "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}
ARCHES = {f"SCMP_ARCH_{name.upper()}": name for name in (
    "x86", "x86_64", "x32", "arm", "aarch64", "mips", "mips64", "mips64n32", "mipsel", "mipsel64",
    "mipsel64n32", "ppc", "ppc64", "ppc64le", "s390", "s390x", "parisc", "parisc64", "riscv64")}
# OCI flag -> libseccomp filter attribute set to 1 (SCMP_FLTATR_CTL_TSYNC, _LOG, _SSB)
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC": 4, "SECCOMP_FILTER_FLAG_LOG": 6, "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 7}
ATTR_CTL_NNP = 3
MAX_ARGS = 6
SYSCALL_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


class SeccompError(Exception):
    pass


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib: Any = None


def preload() -> bool:
    """dlopen libseccomp once; False when it is not installed."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:
            _lib = False
            return False
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
        lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                               ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        _lib = lib
    return bool(_lib)


def available() -> bool:
    return preload()


def action_code(name: str, errno_ret: int) -> int:
    code = ACTIONS[name]
    if name in WITH_DATA:
        code |= (errno_ret or errno.EPERM) & 0xFFFF
    return code


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise SeccompError(f"seccomp: {what}: {errno.errorcode.get(-ret, -ret)}")


def build(cfg: dict[str, Any]) -> int:
    """The libseccomp context of a converted config (agent.oci.SeccompConfig as a dict)."""
    if not preload():
        raise SeccompError("seccomp: libseccomp.so.2 is not installed")
    ctx = _lib.seccomp_init(cfg["default_action"])
    if not ctx:
        raise SeccompError("seccomp: seccomp_init failed")
    try:
        _check(_lib.seccomp_attr_set(ctx, ATTR_CTL_NNP, 0), "no_new_privs attribute")  # ours to set
        for attr in cfg["flags"]:
            _check(_lib.seccomp_attr_set(ctx, attr, 1), f"flag attribute {attr}")
        for arch in cfg["architectures"]:
            token = _lib.seccomp_arch_resolve_name(arch.encode())
            if not token:
                raise SeccompError(f"seccomp: unknown architecture {arch}")
            ret = _lib.seccomp_arch_add(ctx, token)
            if ret != -errno.EEXIST:  # the native one is there already
                _check(ret, f"architecture {arch}")
        for rule in cfg["syscalls"]:
            _add_rule(ctx, cfg["default_action"], rule)
    except BaseException:
        _lib.seccomp_release(ctx)
        raise
    return ctx


def _add_rule(ctx: int, default: int, rule: dict[str, Any]) -> None:
    if rule["action"] == default:
        return  # libseccomp refuses rules that repeat the default action (as runc skips them)
    args = (_ArgCmp * max(len(rule["args"]), 1))(*[_ArgCmp(i, op, a, b) for i, op, a, b in rule["args"]])
    for name in rule["names"]:
        nr = _lib.seccomp_syscall_resolve_name(name.encode())
        if nr == -1:
            continue  # unknown to this libseccomp: skipped, as runc does (profiles list newer calls)
        _check(_lib.seccomp_rule_add_array(ctx, rule["action"], nr, len(rule["args"]), args),
               f"rule for {name}")


def load(ctx: int) -> None:
    try:
        _check(_lib.seccomp_load(ctx), "load")
    finally:
        _lib.seccomp_release(ctx)
