"""The log port (``agent.log_vport``): the agent's JSON log lines, also sent to whoever connects.

As Kata's agent does, the agent listens on the port and the host connects (Kata's runtime dials
the vsock port and reconnects when the stream ends); lines carry slog's level names (``TRCE``,
``DEBG``, ``INFO``, ``WARN``, ``ERRO``, ``CRIT``), which Kata's log forwarder maps back to its own
levels. Console logging (stderr) is unchanged.

Logging never waits for the host: lines wait in a bounded buffer (oldest dropped first, the drop
counted in a line of its own) until a connection takes them; one connection is served at a time,
and a new one is accepted when it ends (lines a dead connection did not take go to the next). The
connection is watched for the host's hang-up, so lines logged after it left are kept for the next
host rather than sent to a dead connection. A forked child (the container spawner) drops the
handler.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
import time

from agent.config import Address
from agent.log import JSONFormatter, TRACE

# slog's short level names, as Kata's agent writes them and its runtime's log forwarder reads them
SLOG_NAMES = {TRACE: "TRCE", logging.DEBUG: "DEBG", logging.INFO: "INFO", logging.WARNING: "WARN",
              logging.ERROR: "ERRO", logging.CRITICAL: "CRIT"}
BUFFER_LIMIT = 1 << 20  # bytes of log lines kept while nobody is connected


class LogPort(logging.Handler):
    def __init__(self, addr: Address, limit: int = BUFFER_LIMIT) -> None:
        super().__init__()
        self.addr = addr
        self.limit = limit
        self.setFormatter(JSONFormatter(names=SLOG_NAMES))
        self._lines: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._dropped = 0
        self._cond = threading.Condition()
        self._closed = False
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.connected = False  # a host's connection is being served

    # --- logging side: never blocks on the connection ---
    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - logging's own contract
            self.handleError(record)
            return
        with self._cond:
            self._lines.append(line)
            self._size += len(line)
            while self._size > self.limit and len(self._lines) > 1:
                self._size -= len(self._lines.popleft())
                self._dropped += 1
            self._cond.notify()

    # --- the port ---
    def listen(self) -> None:
        """Bind and listen now (an error names the address), then serve from a daemon thread."""
        a = self.addr
        if a.scheme not in ("vsock", "unix", "tcp"):
            # a virtio-serial port has one reader, the agent's own channel: not a log port
            raise OSError(0, f"log port {a}: a log port listens on vsock, unix or tcp")
        from agent.server import ListenError, listen_socket  # (loaded by then: agent.wiring's)

        try:
            # a stale unix socket file is replaced, a live one (another agent's) refused
            sock = listen_socket(a, backlog=1)
        except ListenError as exc:
            raise OSError(exc.errno, f"log port {a}: {exc.reason}") from None
        sock.setblocking(True)
        self._listener = sock
        self._thread = threading.Thread(target=self._serve, name="log-port", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.1)  # e.g. EMFILE: do not spin
                continue
            with conn:
                hung_up = threading.Event()
                watcher = threading.Thread(target=self._watch, args=(conn, hung_up),
                                           name="log-port-watch", daemon=True)
                with self._cond:
                    self.connected = True
                watcher.start()
                try:
                    self._pump(conn, hung_up)
                finally:
                    try:
                        conn.shutdown(socket.SHUT_RDWR)  # ends the watcher's recv
                    except OSError:
                        pass
                    watcher.join()
                    with self._cond:
                        self.connected = False
                        self._cond.notify_all()

    def _watch(self, conn: socket.socket, hung_up: threading.Event) -> None:
        """Wait for the host's hang-up (EOF or an error; what it sends is discarded) and wake the
        pump, so that lines logged after the host left wait for the next one instead of going to
        a dead connection (over TCP the first send after a hang-up is accepted, then lost)."""
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        with self._cond:
            hung_up.set()
            self._cond.notify_all()

    def _pump(self, conn: socket.socket, hung_up: threading.Event) -> None:
        while True:
            with self._cond:
                while not self._lines and not self._closed and not hung_up.is_set():
                    self._cond.wait()
                if hung_up.is_set() or (self._closed and not self._lines):
                    return  # what is buffered waits for the next host
                batch, dropped = list(self._lines), self._dropped
                self._lines.clear()
                self._size = self._dropped = 0
            if dropped:
                note = {"level": "WARN", "msg": f"log port: {dropped} lines dropped while nobody read them",
                        "source": "agent", "name": __name__}
                batch.insert(0, (json.dumps(note) + "\n").encode())
            data = b"".join(batch)
            sent = 0
            try:
                while sent < len(data):
                    sent += conn.send(data[sent:])
            except OSError:  # the host went away: what it did not get waits for the next one
                start = data.rfind(b"\n", 0, sent) + 1  # from the first line not sent whole
                with self._cond:
                    rest = data[start:].splitlines(keepends=True)
                    self._lines.extendleft(reversed(rest))
                    self._size += len(data) - start
                return

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
            if self.addr.scheme == "unix" and not self.addr.abstract:
                try:
                    os.unlink(self.addr.host)
                except OSError:
                    pass
        if self._thread is not None:
            self._thread.join(5)
        super().close()

    def _forget_in_child(self) -> None:
        """After a fork: the child is not the agent's logger; its lines stay on its stderr."""
        logging.getLogger().removeHandler(self)


def attach(addr: Address) -> LogPort:
    """A LogPort on the root logger, buffering from now on; call ``listen()`` once forks are done."""
    port = LogPort(addr)
    logging.getLogger().addHandler(port)
    os.register_at_fork(after_in_child=port._forget_in_child)
    return port
