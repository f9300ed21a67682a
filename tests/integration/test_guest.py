"""Guest-management RPCs over gRPC: what this machine can run without being changed.

Onlining CPUs/memory, probing memory, setting the clock, reseeding the pool, swapon and resizing
need a VM (tests/vm); here they are exercised up to their validation.
"""

from __future__ import annotations

import os

import grpc
import pytest

import agent as agent_pkg
from agent.runtime import seccomp


def fails(client, method, request, code):
    with pytest.raises(grpc.RpcError) as err:
        client.call(method, request)
    assert err.value.code() == code, err.value.details()
    return err.value.details()


def test_guest_details(agent):
    reply = agent.client.call_json("GetGuestDetails", {"mem_block_size": True, "mem_hotplug_probe": True})
    details = reply["agent_details"]
    assert details["version"] == agent_pkg.__version__
    assert details.get("init_daemon", False) is False
    assert "policy-json" in details["extra_features"]
    assert details.get("supports_seccomp", False) == seccomp.available()
    block = "/sys/devices/system/memory/block_size_bytes"
    if os.path.exists(block):
        assert int(reply["mem_block_size_bytes"]) == int(open(block).read(), 16)
    assert reply.get("support_mem_hotplug_probe", False) == os.path.exists("/sys/devices/system/memory/probe")


def test_volume_stats(agent, tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 4096)
    reply = agent.client.call_json("GetVolumeStats", {"volume_guest_path": str(tmp_path)})
    units = {u.get("unit"): u for u in reply["usage"]}
    st = os.statvfs(tmp_path)
    assert int(units["BYTES"]["total"]) == st.f_blocks * st.f_frsize
    assert int(units["INODES"]["total"]) == st.f_files
    assert fails(agent.client, "GetVolumeStats", {"volume_guest_path": str(tmp_path / "no")},
                                 grpc.StatusCode.NOT_FOUND).startswith("volume_guest_path:")


def test_diagnostic_data(agent):
    assert "MemTotal" in agent.client.call("GetDiagnosticData", {"log_type": "meminfo"}).data
    assert "log_type" in fails(agent.client, "GetDiagnosticData", {"log_type": "x"},
                               grpc.StatusCode.INVALID_ARGUMENT)


VALIDATION_CASES = [
    ("SetGuestDateTime", {"Sec": 1, "Usec": 2_000_000}, grpc.StatusCode.INVALID_ARGUMENT, "Usec"),
    ("ReseedRandomDev", {}, grpc.StatusCode.INVALID_ARGUMENT, "data: empty"),
    ("AddSwapPath", {"path": "/nonexistent/swap"}, grpc.StatusCode.NOT_FOUND, "path: /nonexistent/swap"),
    ("AddSwapPath", {"path": "/tmp"}, grpc.StatusCode.INVALID_ARGUMENT, "neither a regular file"),
    ("AddSwap", {}, grpc.StatusCode.INVALID_ARGUMENT, "PCIPath: empty"),
    # /run is the agent's own tmpfs (see conftest): never point this at a real disk.
    ("ResizeVolume", {"volume_guest_path": "/run"}, grpc.StatusCode.FAILED_PRECONDITION, "tmpfs, which cannot be grown"),
    # No probe file: FAILED_PRECONDITION; with one, the address is unaligned: INVALID_ARGUMENT.
    ("MemHotplugByProbe", {"memHotplugProbeAddr": ["4294967297"]}, None, "memHotplugProbeAddr"),
    ("MemAgentMemcgSet", {}, grpc.StatusCode.UNIMPLEMENTED, "no memory agent"),
    ("MemAgentCompactSet", {}, grpc.StatusCode.UNIMPLEMENTED, "no memory agent"),
]


def test_validation_answers(agent):
    """One agent for all: each request is refused before it changes anything."""
    for method, request_, code, words in VALIDATION_CASES:
        with pytest.raises(grpc.RpcError) as err:
            agent.client.call(method, request_)
        if code is not None:
            assert err.value.code() == code, (method, err.value.details())
        assert words in err.value.details(), method


def test_swapon_of_a_file_without_signature_is_refused(agent, tmp_path):
    f = tmp_path / "notswap"
    f.write_bytes(b"\0" * 65536)
    os.chmod(f, 0o600)
    assert "no swap signature" in fails(agent.client, "AddSwapPath", {"path": str(f)},
                                        grpc.StatusCode.INVALID_ARGUMENT)


def test_resize_volume_needs_a_mount_point(agent, tmp_path):
    assert "is not a mount point" in fails(agent.client, "ResizeVolume", {"volume_guest_path": str(tmp_path)},
                                           grpc.StatusCode.INVALID_ARGUMENT)
