"""Integration fixtures: the agent runs on this machine as root, in a private mount namespace.

``agent`` is a tests.support.AgentProcess (``python -m agent`` under ``unshare --mount
--propagation private`` with a fresh tmpfs on /run, so every mount it makes dies with it and the
machine's /run is untouched). ``busybox_rootfs`` is a minimal container root built from Debian's
busybox-static. Every test here carries the ``root`` marker and is skipped when not run as root.
"""

from __future__ import annotations

import os
import pathlib
import uuid

import pytest

from tests.support import AgentProcess, make_busybox_rootfs


def pytest_collection_modifyitems(config, items):
    """Mark this folder's tests ``root`` (``-m "not root"`` leaves them out); skip them unless root."""
    here = pathlib.Path(__file__).parent
    skip = pytest.mark.skip(reason="integration tests need root (namespaces, mounts, cgroups)")
    for item in items:
        if here in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.root)
            if os.geteuid() != 0:
                item.add_marker(skip)


@pytest.fixture
def agent_factory(tmp_path):
    started: list[AgentProcess] = []

    def start(extra_args=None, env=None, **kw) -> AgentProcess:
        a = AgentProcess(tmp_path, extra_args, env, **kw)
        started.append(a)
        return a

    yield start
    for a in started:
        if a.proc.poll() is None:
            rc = a.stop()
            assert rc == 0, f"agent exited with {rc}:\n{a.logs()}"


@pytest.fixture
def agent(agent_factory) -> AgentProcess:
    return agent_factory()


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> pathlib.Path:
    """A read-only-shared busybox root for the session; tests that write should copy it."""
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


@pytest.fixture
def container_id() -> str:
    return "t-" + uuid.uuid4().hex[:12]
