"""OCI hooks: Prestart/CreateRuntime at create, Poststart at start, Poststop at removal, with the
container state on stdin; a failing prestart hook undoes the create."""

from __future__ import annotations

import json
import os
import pathlib

import grpc
import pytest

from tests.integration.test_containers import create, make_spec

pytestmark = pytest.mark.timeout(120)

HOOK = """#!/bin/sh
cat > "$DIR/$1.json"
echo "$1" >> "$DIR/order"
exit ${FAIL:-0}
"""


def _hook_script(tmp_path: pathlib.Path) -> pathlib.Path:
    script = tmp_path / "hook.sh"
    script.write_text(HOOK)
    script.chmod(0o755)
    return script


def _hook(script, stage, out, fail=0):
    return {"path": str(script), "args": [str(script), stage], "env": [f"DIR={out}", f"FAIL={fail}"]}


def _state(out: pathlib.Path, stage: str) -> dict:
    return json.loads((out / f"{stage}.json").read_text())


def test_hooks_run_at_their_lifecycle_points_with_the_state(agent, busybox_rootfs, container_id, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = _hook_script(tmp_path)
    cfg = make_spec(busybox_rootfs, ["sh", "-c", "echo container >> /out/order"])
    cfg["mounts"].append({"destination": "/out", "type": "bind", "source": str(out), "options": ["rbind"]})
    cfg["hooks"] = {stage: [_hook(script, stage, out)]
                    for stage in ("prestart", "createRuntime", "poststart", "poststop")}
    cfg["annotations"] = {"a": "b"}
    create(agent, container_id, cfg)
    assert (out / "order").read_text().split() == ["prestart", "createRuntime"]
    pre = _state(out, "prestart")
    assert pre["id"] == container_id and pre["status"] == "creating"
    assert pre["pid"] > 0 and pre["annotations"] == {"a": "b"}
    assert os.path.exists(f"/proc/{pre['pid']}")  # the init waits for start
    assert os.path.basename(pre["bundle"]) == container_id  # /run/kata-containers/<id>, as Kata
    agent.client.call("StartContainer", {"container_id": container_id})
    assert _state(out, "poststart")["status"] == "running"
    assert agent.client.call("WaitProcess", {"container_id": container_id}).status == 0
    assert not (out / "poststop.json").exists()
    agent.client.call("RemoveContainer", {"container_id": container_id})
    post = _state(out, "poststop")
    assert post["status"] == "stopped" and post["pid"] == pre["pid"]
    order = (out / "order").read_text().split()
    assert order[:2] == ["prestart", "createRuntime"] and order[-1] == "poststop"
    assert sorted(order[2:4]) == ["container", "poststart"]


def test_failing_prestart_undoes_the_create(agent, busybox_rootfs, container_id, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = _hook_script(tmp_path)
    cfg = make_spec(busybox_rootfs, ["true"])
    cfg["hooks"] = {"prestart": [_hook(script, "prestart", out, fail=3)],
                    "poststop": [_hook(script, "poststop", out)]}
    with pytest.raises(grpc.RpcError) as err:
        create(agent, container_id, cfg)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "prestart hook" in err.value.details()
    pid = _state(out, "prestart")["pid"]
    assert not os.path.exists(f"/proc/{pid}")  # the init is killed and reaped
    assert not list(pathlib.Path("/sys/fs/cgroup/memory").glob(f"**/{container_id}"))
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("StartContainer", {"container_id": container_id})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (out / "poststop.json").exists()
    # the id is free again, and works without the hook
    cfg["hooks"] = {}
    create(agent, container_id, cfg)
    agent.client.call("RemoveContainer", {"container_id": container_id})


def test_hooks_inside_the_container_are_refused(agent, busybox_rootfs, container_id, tmp_path):
    cfg = make_spec(busybox_rootfs, ["true"])
    cfg["hooks"] = {"createContainer": [{"path": "/bin/true"}]}
    with pytest.raises(grpc.RpcError) as err:
        create(agent, container_id, cfg)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "OCI.Hooks.CreateContainer" in err.value.details()
