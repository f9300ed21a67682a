"""Container helpers over any client: a spec from runc's defaults, the lifecycle, reading output."""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from agent.protocols import agent_pb2
from kata_agent_client.spec import default_config, spec_from_config


def spec(rootfs, args, **overrides):
    cfg = default_config(list(args), rootfs=str(rootfs))
    cfg["root"]["readonly"] = overrides.pop("readonly", False)
    for key, value in overrides.items():
        cfg[key] = value
    return spec_from_config(cfg)


def create(client, cid, oci, **extra):
    client.call("CreateContainer", agent_pb2.CreateContainerRequest(container_id=cid, OCI=oci, **extra))


def read_all(client, cid, stream="ReadStdout", exec_id=""):
    out = b""
    while True:
        data = client.call(stream, {"container_id": cid, "exec_id": exec_id, "len": 65536}).data
        if not data:
            return out
        out += data


def run(client, cid, oci):
    """Create, start, wait, read stdout and stderr, remove: (status, stdout, stderr)."""
    create(client, cid, oci)
    client.call("StartContainer", {"container_id": cid})
    status = client.call("WaitProcess", {"container_id": cid}).status
    out, err = read_all(client, cid), read_all(client, cid, "ReadStderr")
    client.call("RemoveContainer", {"container_id": cid})
    return status, out.decode(errors="replace"), err.decode(errors="replace")


def status_of(fn, *args, **kw) -> tuple[grpc.StatusCode, str]:
    """(code, details) of a call; (OK, "") when it succeeds."""
    try:
        fn(*args, **kw)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def as_dict(msg) -> dict:
    return json_format.MessageToDict(msg)
