"""agent.server's listeners: a unix socket file left by an earlier agent is replaced, a live one
is not (the address is in use), and nothing else is removed."""

from __future__ import annotations

import socket

import pytest

from agent.config import parse_address
from agent.server import ListenError, listen_socket


def _accepts(path: str, listener: socket.socket) -> bool:
    """A client connects to ``path`` and ``listener`` takes that connection."""
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(path)
        listener.setblocking(True)
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.close()
    return True


def test_a_stale_socket_file_is_replaced(tmp_path):
    path = str(tmp_path / "agent.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()  # the file stays, nobody listens: a connect is refused
    with listen_socket(parse_address(f"unix://{path}")) as sock:
        assert _accepts(path, sock)


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_SEQPACKET], ids=["stream", "seqpacket"])
def test_a_live_socket_is_not_replaced(tmp_path, kind):
    """It used to be unlinked and bound over: the live listener lost its address."""
    path = str(tmp_path / "agent.sock")
    with socket.socket(socket.AF_UNIX, kind) as live:
        live.bind(path)
        live.listen(4)
        with pytest.raises(ListenError, match=f"cannot listen on unix://{path}: address in use"):
            listen_socket(parse_address(f"unix://{path}"))
        if kind == socket.SOCK_STREAM:
            assert _accepts(path, live)  # still its address


def test_a_file_that_is_not_a_socket_is_kept(tmp_path):
    path = tmp_path / "agent.sock"
    path.write_text("data")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        listen_socket(parse_address(f"unix://{path}"))
    assert path.read_text() == "data"
