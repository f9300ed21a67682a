"""Spawner supervision on the agent side, with the spawner process replaced by fakes (no root)."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from agent.runtime import spawner as spawner_mod


def _exited(handle: spawner_mod.Spawner, status: int = 9) -> None:
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
        fut.set_result(status)
        handle._exited(fut)
    finally:
        loop.close()


def test_a_spawner_that_cannot_be_restarted_fails_requests_at_once(monkeypatch):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    handle = spawner_mod.Spawner(12345, ours)

    def no_spawn():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(spawner_mod, "_spawn", no_spawn)
    _exited(handle)
    assert ours.fileno() == -1          # the old socket is closed: what was queued there ends
    with pytest.raises(spawner_mod.SpawnError, match="could not be restarted"):
        handle.request({"op": "task", "name": "x", "args": {}})
    theirs.close()


def test_restarts_stop_after_the_limit(monkeypatch):
    spawned = []

    def fake_spawn():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spawned.extend((b, d))
        return 1000 + len(spawned), a, c

    monkeypatch.setattr(spawner_mod, "_spawn", fake_spawn)
    monkeypatch.setattr(spawner_mod.Spawner, "supervise", lambda self: None)
    handle = spawner_mod.Spawner(*fake_spawn())
    for _ in range(spawner_mod.Spawner.RESTARTS):
        _exited(handle)
        assert not handle.gone
    _exited(handle)
    assert "not restarted" in handle.gone
    with pytest.raises(spawner_mod.SpawnError):
        handle.request({"op": "task", "name": "x", "args": {}})
    for s in spawned:
        s.close()
