"""kata_agent_client.oci_image: a failed write leaves no half archive."""

from __future__ import annotations

import pathlib
import shutil

import pytest

from kata_agent_client import oci_image


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static is not installed")
def test_a_failed_write_leaves_no_temporary_archive(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "replace", full)  # the archive is written, its rename fails
    with pytest.raises(OSError):
        oci_image.build(tmp_path / "busybox.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
