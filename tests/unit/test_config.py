"""Address parsing and settings precedence (flag > environment > kernel cmdline > default)."""

from __future__ import annotations

import pytest

from agent import linux
from agent.config import VMADDR_CID_ANY, ConfigError, agent_keys, load, parse_address


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
