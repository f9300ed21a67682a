"""agent.storage.StorageManager without mounts: the ``local`` driver makes plain directories."""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from agent.errors import InvalidArgument
from agent.protocols import agent_pb2
from agent.storage import MountContext, StorageManager, paths
from agent.undo import UndoStack


def manager(tmp_path) -> StorageManager:
    run_dir = tmp_path / "run"
    kata_root = run_dir / "kata-containers"
    kata_root.mkdir(parents=True)
    return StorageManager(MountContext(uevents=None, hotplug_timeout=1, kata_root=str(kata_root),
                                       run_dir=str(run_dir)))


def local(mount_point: str) -> agent_pb2.Storage:
    return agent_pb2.Storage(driver="local", mount_point=mount_point)


def add(storages: StorageManager, mount_point: str) -> str:
    [checked] = storages.check([local(mount_point)], "storages")
    return asyncio.run(storages.add(checked))


def test_sweep_finds_logs_and_takes_down_only_what_leaked(tmp_path, caplog):
    storages = manager(tmp_path)
    kept = add(storages, "/run/kata-containers/sandbox/kept")
    leaked = add(storages, "/run/kata-containers/sandbox/leaked")
    add(storages, "/run/kata-containers/sandbox/leaked")
    storages.release(kept)
    storages.release(leaked)  # one of its two references is never released
    assert not os.path.exists(kept) and os.path.isdir(leaked)
    with caplog.at_level(logging.ERROR, logger="agent.storage"):
        assert storages.sweep_leaks() == [leaked]
    assert [r.fields["mount_point"] for r in caplog.records if r.msg.startswith("storage leaked")] == [leaked]
    assert not os.path.exists(leaked) and storages.mounts == {}
    assert storages.sweep_leaks() == []


def test_each_mount_point_is_resolved_once_from_check_to_mount(tmp_path, monkeypatch):
    """check resolves each mount point once (it resolved them again at mount, and realpath'd
    every earlier one for each storage); add_all mounts what check returned."""
    storages = manager(tmp_path)
    resolved: list[str] = []
    realpaths: list[str] = []
    lexical_under, realpath = paths.lexical_under, os.path.realpath
    request = [local(f"/run/kata-containers/sandbox/v{i}") for i in range(5)]
    undo = UndoStack()
    with monkeypatch.context() as patch:
        patch.setattr(paths, "lexical_under", lambda path, *a: resolved.append(path) or lexical_under(path, *a))
        patch.setattr(os.path, "realpath", lambda path, **kw: realpaths.append(path) or realpath(path, **kw))
        checked = storages.check(request, "storages")
        keys = asyncio.run(storages.add_all(checked, undo))
    assert realpaths == []
    assert resolved == [paths.map_run_dir(s.mount_point, storages.ctx.run_dir) for s in request]
    assert keys == [os.path.join(storages.ctx.kata_root, "sandbox", f"v{i}") for i in range(5)]
    assert all(os.path.isdir(k) for k in keys)
    asyncio.run(undo.rollback())
    assert storages.mounts == {} and not any(os.path.exists(k) for k in keys)


@pytest.mark.parametrize("second", [
    "/run/kata-containers/sandbox/v", "/run/kata-containers/sandbox/./v", "/run/kata-containers//sandbox/v/",
])
def test_one_mount_point_twice_is_refused(tmp_path, second):
    storages = manager(tmp_path)
    with pytest.raises(InvalidArgument, match=r"storages\[1\]\.mount_point: .* appears twice"):
        storages.check([local("/run/kata-containers/sandbox/v"), local(second)], "storages")
