"""RemoveContainer's timeout with Kata's meaning: the container is SIGKILLed at once, and
``timeout`` only bounds how long the call waits for the removal."""

from __future__ import annotations

import os
import threading
import time

import grpc
import pytest

from tests.integration.test_containers import create, make_spec

pytestmark = pytest.mark.timeout(120)


def test_no_sigterm_first_and_no_wait(agent, busybox_rootfs, container_id, tmp_path):
    """A container that would record a SIGTERM: after RemoveContainer(timeout=10) there is none,
    because the agent killed it with SIGKILL straight away (it used to SIGTERM and wait)."""
    out = tmp_path / "out"
    out.mkdir()
    cfg = make_spec(busybox_rootfs, ["sh", "-c", 'trap "echo term > /out/term" TERM; echo up > /out/up; '
                                                 'while :; do sleep 1; done'])
    cfg["mounts"].append({"destination": "/out", "type": "bind", "source": str(out), "options": ["rbind"]})
    create(agent, container_id, cfg)
    agent.client.call("StartContainer", {"container_id": container_id})
    while not (out / "up").exists():  # the trap is set
        time.sleep(0.02)
    agent.client.call("RemoveContainer", {"container_id": container_id, "timeout": 10})
    assert not (out / "term").exists()
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("StatsContainer", {"container_id": container_id})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_created_never_started_container_is_removed(agent, busybox_rootfs, container_id):
    create(agent, container_id, make_spec(busybox_rootfs, ["true"]))
    agent.client.call("RemoveContainer", {"container_id": container_id, "timeout": 10})
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("StatsContainer", {"container_id": container_id})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_timeout_bounds_the_wait_and_the_removal_goes_on(agent, busybox_rootfs, container_id, tmp_path):
    """A Poststop hook blocks on a FIFO: RemoveContainer(timeout=1) answers DEADLINE_EXCEEDED while
    the removal waits; once the FIFO opens, a second RemoveContainer joins that same removal."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\ncat > /dev/null\nread line < {gate}\necho "$line" > {tmp_path}/hook-ran\n')
    hook.chmod(0o755)
    cfg = make_spec(busybox_rootfs, ["true"])
    cfg["hooks"] = {"poststop": [{"path": str(hook), "args": [str(hook)]}]}
    create(agent, container_id, cfg)
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("RemoveContainer", {"container_id": container_id, "timeout": 1})
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "removal did not finish within 1s" in err.value.details()
    assert not (tmp_path / "hook-ran").exists()

    second: list = []
    t = threading.Thread(target=lambda: second.append(
        agent.client.call("RemoveContainer", {"container_id": container_id})))
    t.start()
    with open(gate, "w") as f:  # opens once the hook reads: the first removal is the one waiting
        f.write("go\n")
    t.join(60)
    assert second and (tmp_path / "hook-ran").read_text() == "go\n"
    with pytest.raises(grpc.RpcError) as err:
        agent.client.call("StatsContainer", {"container_id": container_id})
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
