"""qemu/template.py without QEMU: the shared copy of a template's RAM, and a missing template."""

from __future__ import annotations

import os

import pytest

from qemu.template import Template, TemplateError, shared_copy


def test_shared_copy_copies_the_data_and_keeps_the_holes(tmp_path):
    tpl = Template(tmp_path)
    size = 64 << 20
    chunks = {0: b"head" * 1024, 5 << 20: os.urandom(3 << 20), size - 4096: b"t" * 4096}
    with open(tpl.memory, "wb") as f:
        f.truncate(size)
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    fd = shared_copy(tpl)
    try:
        st = os.fstat(fd)
        assert st.st_size == size
        assert st.st_blocks * 512 < 8 << 20  # the holes stayed holes
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as copy, open(tpl.memory, "rb") as orig:
            assert copy.read() == orig.read()
    finally:
        os.close(fd)


def test_a_missing_template_is_an_error(tmp_path):
    tpl = Template(tmp_path / "none")
    assert not tpl.exists()
    with pytest.raises(TemplateError, match="no usable template"):
        tpl.manifest()


def test_wait_served_refuses_an_agent_that_hangs_up(tmp_path):
    """A template is saved only once the agent answers: an agent that accepts and closes (it
    died, or dropped the connection) is not served, as a deadline is not."""
    import socket
    import threading

    from qemu.vm import BootError, wait_served

    path = tmp_path / "agent.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()

    def hang_up():
        conn, _ = srv.accept()
        conn.recv(1 << 16)
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(BootError):
            wait_served(f"unix://{path}", timeout=5)
    finally:
        t.join()
        srv.close()
