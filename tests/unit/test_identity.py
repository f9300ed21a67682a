"""agent.identity: the guest's machine-id."""

from __future__ import annotations

import stat

from agent import identity


def test_ensure_keeps_a_valid_id_and_replaces_a_bad_one(tmp_path):
    path = str(tmp_path / "machine-id")
    first = identity.ensure_machine_id(path)
    assert len(first) == 32 and int(first, 16) >= 0
    assert identity.ensure_machine_id(path) == first
    assert stat.S_IMODE((tmp_path / "machine-id").stat().st_mode) == 0o444
    (tmp_path / "machine-id").chmod(0o644)
    (tmp_path / "machine-id").write_text("not-an-id\n")
    assert identity.read_machine_id(path) == ""
    assert identity.ensure_machine_id(path) not in ("", first)


def test_write_draws_a_new_one_each_time(tmp_path):
    path = str(tmp_path / "machine-id")
    ids = {identity.write_machine_id(path) for _ in range(3)}
    assert len(ids) == 3
    assert (tmp_path / "machine-id").read_text().strip() in ids
