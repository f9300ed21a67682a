"""The log port: JSON lines with slog's level names, buffered until a host connects."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from agent.config import parse_address
from agent.log import TRACE
from agent.logport import LogPort


@pytest.fixture
def port(tmp_path):
    handler = LogPort(parse_address(f"unix://{tmp_path}/log.sock"), limit=4096)
    logger = logging.getLogger(f"test-logport-{id(handler)}")
    logger.setLevel(TRACE)
    logger.propagate = False
    logger.addHandler(handler)
    yield handler, logger, f"{tmp_path}/log.sock"
    logger.removeHandler(handler)
    handler.close()


def _read_lines(conn: socket.socket, count: int, buf: bytearray | None = None) -> list[dict]:
    """The first ``count`` lines read (``buf`` keeps what was read, across calls)."""
    buf = bytearray() if buf is None else buf
    conn.settimeout(30)
    while buf.count(b"\n") < count:
        chunk = conn.recv(65536)
        assert chunk, f"log port closed after {bytes(buf)!r}"
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()[:count]]


def test_levels_are_slog_names_and_early_lines_wait_for_the_host(port):
    handler, logger, path = port
    handler.listen()
    for level in (TRACE, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        logger.log(level, "at %d", level, extra={"fields": {"container_id": "c1"}})
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        lines = _read_lines(conn, 6)
    assert [e["level"] for e in lines] == ["TRCE", "DEBG", "INFO", "WARN", "ERRO", "CRIT"]
    assert [e["msg"] for e in lines] == [f"at {n}" for n in (5, 10, 20, 30, 40, 50)]
    assert {e["container_id"] for e in lines} == {"c1"}


def test_a_later_connection_gets_later_lines(port):
    handler, logger, path = port
    handler.listen()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        logger.info("first")
        assert [e["msg"] for e in _read_lines(conn, 1)] == ["first"]
    logger.info("second")
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        lines = _read_lines(conn, 1)
    assert lines[-1]["msg"] == "second"


def test_unread_lines_are_bounded_and_the_drop_is_reported(port):
    handler, logger, path = port
    for i in range(200):  # far beyond the 4 KiB limit
        logger.info("line %03d", i)
    handler.listen()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        buf = bytearray()
        first = _read_lines(conn, 1, buf)[0]
        assert first["level"] == "WARN" and "lines dropped" in first["msg"]
        dropped = int(first["msg"].split()[2])
        rest = _read_lines(conn, 1 + 200 - dropped, buf)  # all that is left, oldest first
    assert [e["msg"] for e in rest[1:]] == [f"line {i:03d}" for i in range(dropped, 200)]


def test_a_port_in_use_is_an_error_naming_it(port, tmp_path):
    handler, _, path = port
    handler.listen()
    other = LogPort(parse_address(f"unix://{path}"))
    with pytest.raises(OSError, match=f"log port unix://{path}"):
        other.listen()


def _until(predicate, what: str) -> None:
    """Wait for a state of the port's thread (bounded only so that a failure cannot hang)."""
    for _ in range(3000):
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail(f"never: {what}")


def test_lines_logged_after_the_host_hung_up_wait_for_the_next_host():
    """Over TCP the first send after the host left is accepted and lost: the port watches the
    connection for the hang-up, so it never sends those lines there (it noticed the hang-up only
    at its next send, and nothing was kept of that batch)."""
    handler = LogPort(parse_address("tcp://127.0.0.1:0"), limit=4096)
    logger = logging.getLogger(f"test-logport-{id(handler)}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        handler.listen()
        addr = handler._listener.getsockname()
        with socket.create_connection(addr) as first:
            logger.warning("to the first host")
            assert [e["msg"] for e in _read_lines(first, 1)] == ["to the first host"]
        _until(lambda: not handler.connected, "the first host's hang-up was seen")
        logger.warning("after it left")
        logger.warning("still nobody")
        with socket.create_connection(addr) as second:
            assert [e["msg"] for e in _read_lines(second, 2)] == ["after it left", "still nobody"]
    finally:
        logger.removeHandler(handler)
        handler.close()


def test_a_stale_socket_file_is_replaced(port):
    """A socket file left by an earlier agent (nobody listens on it) used to make the bind fail."""
    handler, logger, path = port
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    handler.listen()
    logger.info("after the stale one")
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(path)
        assert [e["msg"] for e in _read_lines(conn, 1)] == ["after the stale one"]


def test_a_serial_address_is_refused():
    with pytest.raises(OSError, match="log port serial:///dev/virtio-ports/x: a log port listens on vsock"):
        LogPort(parse_address("serial:///dev/virtio-ports/x")).listen()
