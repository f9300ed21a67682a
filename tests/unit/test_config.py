"""Address parsing and settings precedence (flag > environment > kernel cmdline > default)."""

from __future__ import annotations

import pytest

from agent import linux
from agent.config import VMADDR_CID_ANY, ConfigError, agent_keys, arg_parser, load, no_flags, parse_address


@pytest.mark.parametrize("text,target", [
    ("vsock://-1:1024", f"vsock:{VMADDR_CID_ANY}:1024"),
    ("vsock://3:1024", "vsock:3:1024"),
    ("tcp://127.0.0.1:5000", "127.0.0.1:5000"),
    ("tcp://0.0.0.0:0", "0.0.0.0:0"),
    ("tcp://[::1]:5000", "[::1]:5000"),
    ("tcp://localhost:80", "localhost:80"),
    ("unix:///run/agent.sock", "unix:/run/agent.sock"),
    ("unix://@kata-agent", "unix-abstract:kata-agent"),
])
def test_parse_address(text, target):
    addr = parse_address(text)
    assert addr.grpc_target() == target
    assert str(addr) == text


@pytest.mark.parametrize("text,words", [
    ("1024", "expected vsock://"),
    ("http://x:1", "unknown scheme"),
    ("vsock://x:1024", "CID a number"),
    ("vsock://3", "CID a number"),
    ("vsock://4294967296:1", "CID out of range"),
    ("tcp://127.0.0.1", "expected tcp://HOST:PORT"),
    ("tcp://127.0.0.1:65536", "port must be"),
    ("tcp://::1:80", "expected tcp://HOST:PORT"),
    ("unix://relative.sock", "ABSOLUTE"),
    ("unix://@", "ABSOLUTE"),
])
def test_parse_address_rejects(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_address(text)


def test_agent_keys_keeps_only_agent_keys():
    got = agent_keys(linux.parse_cmdline(
        "console=ttyS0 agent.log=debug agent.server_addr=tcp://0.0.0.0:1 agent.debug_console quiet"))
    assert got == {"log": "debug", "server_addr": "tcp://0.0.0.0:1", "debug_console": ""}


@pytest.fixture
def cmdline(tmp_path):
    path = tmp_path / "cmdline"
    path.write_text("agent.server_addr=tcp://1.1.1.1:3 agent.log=warn agent.hotplug_timeout=7 agent.debug_console\n")
    return ["--cmdline-file", str(path)]


def test_defaults_without_any_source(tmp_path):
    cfg = load(["--cmdline-file", str(tmp_path / "missing")], environ={})
    assert [str(a) for a in cfg.server_addrs] == ["vsock://-1:1024"]
    assert (cfg.log_level, cfg.hotplug_timeout, cfg.debug_console) == ("info", 3.0, False)


def test_cmdline_beats_default(cmdline):
    cfg = load(cmdline, environ={})
    assert [str(a) for a in cfg.server_addrs] == ["tcp://1.1.1.1:3"]
    assert (cfg.log_level, cfg.hotplug_timeout, cfg.debug_console) == ("warn", 7.0, True)


def test_environment_beats_cmdline(cmdline):
    env = {"KATA_AGENT_SERVER_ADDR": "tcp://2.2.2.2:4,unix:///x.sock", "KATA_AGENT_LOG_LEVEL": "error",
           "KATA_AGENT_HOTPLUG_TIMEOUT": "1.5"}
    cfg = load(cmdline, environ=env)
    assert [str(a) for a in cfg.server_addrs] == ["tcp://2.2.2.2:4", "unix:///x.sock"]
    assert (cfg.log_level, cfg.hotplug_timeout) == ("error", 1.5)


def test_flags_beat_environment(cmdline):
    env = {"KATA_AGENT_SERVER_ADDR": "tcp://2.2.2.2:4", "KATA_AGENT_LOG_LEVEL": "error"}
    cfg = load([*cmdline, "--server-addr", "tcp://3.3.3.3:5", "--server-addr", "vsock://3:1024",
                "--log-level", "debug", "--hotplug-timeout", "2"], environ=env)
    assert [str(a) for a in cfg.server_addrs] == ["tcp://3.3.3.3:5", "vsock://3:1024"]
    assert (cfg.log_level, cfg.hotplug_timeout) == ("debug", 2.0)


@pytest.mark.parametrize("env,words", [
    ({"KATA_AGENT_SERVER_ADDR": "nonsense"}, "expected vsock://"),
    ({"KATA_AGENT_LOG_LEVEL": "loud"}, "log level 'loud'"),
    ({"KATA_AGENT_HOTPLUG_TIMEOUT": "soon"}, "KATA_AGENT_HOTPLUG_TIMEOUT"),
    ({"KATA_AGENT_HOTPLUG_TIMEOUT": "-1"}, "between 0 and 3600"),
])
def test_bad_settings_name_their_source(tmp_path, env, words):
    with pytest.raises(ConfigError, match=words):
        load(["--cmdline-file", str(tmp_path / "none")], environ=env)


def test_quoted_kernel_command_line_value(tmp_path):
    path = tmp_path / "cmdline"
    path.write_text('console=ttyS0 agent.policy="/run/my policy.json" agent.log=debug\n')
    cfg = load(["--cmdline-file", str(path)], environ={})
    assert (cfg.policy_file, cfg.log_level) == ("/run/my policy.json", "debug")


def _boot(tmp_path, line: str):
    path = tmp_path / "cmdline"
    path.write_text(line + "\n")
    return load(["--cmdline-file", str(path)], environ={})


def test_kata_kernel_command_line_keys(tmp_path):
    cfg = _boot(tmp_path, "console=hvc0 agent.debug_console agent.debug_console_vport=1026 agent.log_vport=1025 "
                          "agent.container_pipe_size=131072 agent.devmode agent.unified_cgroup_hierarchy=1 "
                          "agent.hotplug_timeout=5 agent.server_addr=vsock://-1:2048 agent.trace=false")
    assert (cfg.debug_console, cfg.debug_console_vport, cfg.log_vport) == (True, 1026, 1025)
    assert (cfg.container_pipe_size, cfg.dev_mode, cfg.unified_cgroup_hierarchy) == (131072, True, True)
    assert (cfg.hotplug_timeout, [str(a) for a in cfg.server_addrs], cfg.trace) == (5.0, ["vsock://-1:2048"], False)
    assert cfg.log_level == "debug"  # devmode implies debug, as in Kata
    assert [n for n in cfg.notes if n[0] != "debug"] == []


def test_defaults_leave_operator_access_off(tmp_path):
    cfg = _boot(tmp_path, "console=ttyS0 quiet")
    assert (cfg.debug_console, cfg.debug_console_vport, cfg.log_vport, cfg.container_pipe_size) == (False, 0, 0, 0)
    assert (cfg.dev_mode, cfg.trace, cfg.unified_cgroup_hierarchy, cfg.notes) == (False, False, True, [])


def test_explicit_log_level_beats_devmode(tmp_path):
    assert _boot(tmp_path, "agent.devmode agent.log=warn").log_level == "warn"
    assert _boot(tmp_path, "agent.log=fatal").log_level == "critical"  # logrus's name, as Kata maps it


def test_trace_is_accepted_and_reported_unsupported(tmp_path):
    cfg = _boot(tmp_path, "agent.trace")
    assert cfg.trace is True
    assert [level for level, msg in cfg.notes if "agent.trace" in msg and "not supported" in msg] == ["warning"]


def test_unknown_agent_key_is_ignored_as_kata_does(tmp_path):
    cfg = _boot(tmp_path, "agent.no_such_key=1 agent.ip=none foo=bar agent.log=debug")
    assert cfg.log_level == "debug"
    assert cfg.notes == [("debug", "agent.no_such_key: not a setting of this agent, ignored (as Kata's agent does)")]


@pytest.mark.parametrize("key,value,field,default", [
    ("log", "loud", "log_level", "info"),
    ("hotplug_timeout", "0", "hotplug_timeout", 3.0),
    ("hotplug_timeout", "soon", "hotplug_timeout", 3.0),
    ("debug_console", "maybe", "debug_console", False),
    ("debug_console_vport", "0", "debug_console_vport", 0),
    ("debug_console_vport", "-5", "debug_console_vport", 0),
    ("log_vport", "x", "log_vport", 0),
    ("container_pipe_size", "-1", "container_pipe_size", 0),
    ("devmode", "2", "dev_mode", False),
    ("unified_cgroup_hierarchy", "yes please", "unified_cgroup_hierarchy", True),
    ("server_addr", "nonsense", "server_addrs", ["vsock://-1:1024"]),
])
def test_malformed_kernel_value_keeps_default_and_names_the_key(tmp_path, key, value, field, default):
    cfg = _boot(tmp_path, f'agent.{key}="{value}" agent.log_vport=1025' if key != "log_vport" else f"agent.{key}={value}")
    got = getattr(cfg, field)
    assert ([str(a) for a in got] if field == "server_addrs" else got) == default
    errors = [msg for level, msg in cfg.notes if level == "error"]
    assert len(errors) == 1 and f"agent.{key}={value!r}" in errors[0] and "default" in errors[0]
    if key != "log_vport":
        assert cfg.log_vport == 1025  # the other keys still apply


def test_notes_are_logged_once_logging_is_up(tmp_path):
    import io
    import json

    from agent import log as log_mod

    cfg = _boot(tmp_path, "agent.log_vport=x agent.trace")
    stream = io.StringIO()
    log_mod.setup("info", stream)
    log_mod.report_settings(cfg)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], "agent.log_vport" in e["msg"] or "agent.trace" in e["msg"]) for e in lines] == [
        ("error", True), ("warning", True)]


def test_pipe_size_is_applied_to_container_stdio():
    import fcntl
    import os

    from agent.stdio import Stdio

    stdio, child = Stdio.create(False, pipe_size=1 << 20)
    try:
        assert [fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) for fd in child] == [1 << 20] * 3
    finally:
        for fd in child + [stdio.stdin, stdio.stdout, stdio.stderr]:
            os.close(fd)
    stdio, child = Stdio.create(False)
    try:
        assert fcntl.fcntl(child[1], fcntl.F_GETPIPE_SZ) != 1 << 20  # the kernel's default otherwise
    finally:
        for fd in child + [stdio.stdin, stdio.stdout, stdio.stderr]:
            os.close(fd)


def test_cgroup_v1_hierarchies_from_proc_cgroups():
    from agent.init import v1_hierarchies

    proc = ("#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpuset\t0\t1\t1\ncpu\t0\t1\t1\ncpuacct\t0\t1\t1\n"
            "blkio\t0\t1\t1\nmemory\t0\t1\t1\ndevices\t0\t1\t1\nfreezer\t0\t1\t1\nnet_cls\t0\t1\t1\n"
            "perf_event\t0\t1\t1\nnet_prio\t0\t1\t1\nhugetlb\t0\t1\t0\npids\t0\t1\t1\n")
    assert v1_hierarchies(proc) == [("cpuset",), ("cpu", "cpuacct"), ("blkio",), ("memory",), ("devices",),
                                    ("freezer",), ("net_cls", "net_prio"), ("perf_event",), ("pids",)]


def test_no_flags_is_what_the_parser_makes_of_none():
    # load() skips argparse when there are no flags (the guest's PID 1): the two must agree
    assert vars(arg_parser().parse_args([])) == vars(no_flags())
