"""agent.storage.StorageManager without mounts: the ``local`` driver makes plain directories."""

from __future__ import annotations

import asyncio
import logging
import os

from agent.protocols import agent_pb2
from agent.storage import MountContext, StorageManager


def manager(tmp_path) -> StorageManager:
    run_dir = tmp_path / "run"
    kata_root = run_dir / "kata-containers"
    kata_root.mkdir(parents=True)
    return StorageManager(MountContext(uevents=None, hotplug_timeout=1, kata_root=str(kata_root),
                                       run_dir=str(run_dir)))


def local(mount_point: str) -> agent_pb2.Storage:
    return agent_pb2.Storage(driver="local", mount_point=mount_point)


def test_sweep_finds_logs_and_takes_down_only_what_leaked(tmp_path, caplog):
    storages = manager(tmp_path)
    kept = asyncio.run(storages.add(local("/run/kata-containers/sandbox/kept"), "storages[0]"))
    leaked = asyncio.run(storages.add(local("/run/kata-containers/sandbox/leaked"), "storages[1]"))
    asyncio.run(storages.add(local("/run/kata-containers/sandbox/leaked"), "storages[0]"))
    storages.release(kept)
    storages.release(leaked)  # one of its two references is never released
    assert not os.path.exists(kept) and os.path.isdir(leaked)
    with caplog.at_level(logging.ERROR, logger="agent.storage"):
        assert storages.sweep_leaks() == [leaked]
    assert [r.fields["mount_point"] for r in caplog.records if r.msg.startswith("storage leaked")] == [leaked]
    assert not os.path.exists(leaked) and storages.mounts == {}
    assert storages.sweep_leaks() == []
