"""Container lifecycle over gRPC against a real agent, on a busybox rootfs."""

from __future__ import annotations

import os
import pathlib

import grpc
import pytest

from kata_agent_client.spec import default_config, spec_from_config

pytestmark = pytest.mark.timeout(120)


def make_spec(rootfs, args, **overrides):
    cfg = default_config(args, rootfs=str(rootfs))
    cfg["root"]["readonly"] = overrides.pop("readonly", False)
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def create(agent, cid, cfg, **extra):
    agent.client.call("CreateContainer", {"container_id": cid, "OCI": _json(cfg), **extra})


def _json(cfg):
    from google.protobuf import json_format

    return json_format.MessageToDict(spec_from_config(cfg))


def read_all(agent, cid, stream="ReadStdout", exec_id=""):
    out = b""
    while True:
        data = agent.client.call(stream, {"container_id": cid, "exec_id": exec_id, "len": 65536}).data
        if not data:
            return out
        out += data


def run(agent, cid, cfg, stdin: bytes | None = None):
    """Create, start, wait, read everything, remove: (status, stdout, stderr)."""
    create(agent, cid, cfg)
    agent.client.call("StartContainer", {"container_id": cid})
    if stdin is not None:
        agent.client.call("WriteStdin", {"container_id": cid, "data": stdin})
        agent.client.call("CloseStdin", {"container_id": cid})
    status = agent.client.call("WaitProcess", {"container_id": cid}).status
    out, err = read_all(agent, cid), read_all(agent, cid, "ReadStderr")
    agent.client.call("RemoveContainer", {"container_id": cid})
    return status, out.decode(), err.decode()


def sh(agent, cid, rootfs, script, **kw):
    return run(agent, cid, make_spec(rootfs, ["sh", "-c", script], **kw))


def test_echo_lifecycle(agent, busybox_rootfs, container_id):
    status, out, err = sh(agent, container_id, busybox_rootfs, "echo hi; echo oops >&2; exit 3")
    assert (status, out, err) == (3, "hi\n", "oops\n")


def test_pid1_and_hostname(agent, busybox_rootfs, container_id):
    status, out, _ = sh(agent, container_id, busybox_rootfs, "echo $$; hostname", hostname="box1")
    assert status == 0
    assert out.split() == ["1", "box1"]
