"""cgroup v2 device rules: a BPF_PROG_TYPE_CGROUP_DEVICE program attached to the cgroup.

The program checks the rules last to first and answers with the first that matches, so the last
matching rule wins, as with v1 devices.allow/deny lists; no match denies when the rules start
with a deny-all, else allows. An allow rule matches when it grants every access asked for; a
deny rule when it refuses any of them.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

from agent import linux
from agent.linux import (BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI, BPF_PROG_ATTACH, BPF_PROG_DETACH,
                         BPF_PROG_LOAD, BPF_PROG_TYPE_CGROUP_DEVICE)

_ACCESS = {"m": 1, "r": 2, "w": 4}
_TYPE = {"b": 1, "c": 2}


@dataclass(frozen=True)
class Rule:
    allow: bool
    kind: str  # a, b or c
    major: int  # -1: any
    minor: int  # -1: any
    access: str


def parse_rule(file: str, text: str) -> Rule:
    """("devices.allow", "c 1:3 rwm") -> Rule, the form plan.device_rule produces."""
    kind, numbers, access = text.split()
    major, _, minor = numbers.partition(":")
    return Rule(file == "devices.allow", kind, -1 if major == "*" else int(major),
                -1 if minor == "*" else int(minor), access)


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_LDXW, _MOV_X, _AND_K, _RSH_K, _JNE_K, _JEQ_K, _MOV_K, _EXIT = (
    0x61, 0xBF, 0x57, 0x77, 0x55, 0x15, 0xB7, 0x95)


def _rule_block(rule: Rule) -> list[tuple[int, int, int, int, int, bool]]:
    """Instructions of one rule; the bool marks jumps to the next rule (offset fixed later)."""
    acc = sum(_ACCESS[c] for c in rule.access)
    out = []
    if rule.kind != "a":
        out.append((_JNE_K, 3, 0, 0, _TYPE[rule.kind], True))
    out.append((_MOV_X, 7, 4, 0, 0, False))
    if rule.allow:  # any access asked for that the rule lacks -> no match
        out += [(_AND_K, 7, 0, 0, ~acc & 0xFFFF, False), (_JNE_K, 7, 0, 0, 0, True)]
    else:  # none of the rule's accesses asked for -> no match
        out += [(_AND_K, 7, 0, 0, acc, False), (_JEQ_K, 7, 0, 0, 0, True)]
    if rule.kind != "a" and rule.major >= 0:
        out.append((_JNE_K, 5, 0, 0, rule.major, True))
    if rule.kind != "a" and rule.minor >= 0:
        out.append((_JNE_K, 6, 0, 0, rule.minor, True))
    out += [(_MOV_K, 0, 0, 0, int(rule.allow), False), (_EXIT, 0, 0, 0, 0, False)]
    return out


def program(rules: list[Rule]) -> bytes:
    """The BPF instructions for ``rules`` (in their written order)."""
    default_allow = not (rules and not rules[0].allow and rules[0].kind == "a")
    code = [
        _insn(_LDXW, 2, 1, 0),  # r2 = ctx->access_type
        _insn(_MOV_X, 3, 2), _insn(_AND_K, 3, imm=0xFFFF),  # r3 = device type
        _insn(_MOV_X, 4, 2), _insn(_RSH_K, 4, imm=16),  # r4 = access asked for
        _insn(_LDXW, 5, 1, 4), _insn(_LDXW, 6, 1, 8),  # r5 = major, r6 = minor
    ]
    for rule in reversed(rules):
        block = _rule_block(rule)
        for i, (op, dst, src, _off, imm, to_next) in enumerate(block):
            off = len(block) - i - 1 if to_next else 0
            code.append(_insn(op, dst, src, off, imm))
    code += [_insn(_MOV_K, 0, imm=int(default_allow)), _insn(_EXIT)]
    return b"".join(code)


def _load(insns: ctypes.Array, log_size: int) -> int:
    license_ = ctypes.create_string_buffer(b"Apache")
    log = ctypes.create_string_buffer(max(log_size, 1))
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_CGROUP_DEVICE, len(insns.raw) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1 if log_size else 0,
                     log_size, ctypes.addressof(log) if log_size else 0)
    try:
        return linux.bpf(BPF_PROG_LOAD, attr)
    except OSError as exc:
        if not log_size:
            raise
        text = log.value.decode(errors="replace").strip().splitlines()[-3:]
        raise OSError(exc.errno, f"{exc.strerror}: {' / '.join(text)}") from None


def load(rules: list[Rule]) -> int:
    """Load the program; its fd. On a refusal, load again with the verifier's log for the error."""
    insns = ctypes.create_string_buffer(program(rules))
    try:
        return _load(insns, 0)
    except OSError:
        return _load(insns, 1 << 20)


def _attach_cmd(cmd: int, directory: str, prog_fd: int) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIII", attr, 0, dir_fd, prog_fd, BPF_CGROUP_DEVICE,
                         BPF_F_ALLOW_MULTI if cmd == BPF_PROG_ATTACH else 0)
        linux.bpf(cmd, attr)
    finally:
        os.close(dir_fd)


def attach(directory: str, rules: list[Rule]) -> int:
    """Load and attach; returns the program fd (keep it to detach on a later update)."""
    fd = load(rules)
    try:
        _attach_cmd(BPF_PROG_ATTACH, directory, fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def detach(directory: str, prog_fd: int) -> None:
    try:
        _attach_cmd(BPF_PROG_DETACH, directory, prog_fd)
    finally:
        os.close(prog_fd)
