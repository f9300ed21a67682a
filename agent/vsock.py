"""vsock listening sockets.

The agent accepts vsock connections itself (as it does TCP and unix ones; agent.server): PyPI's
grpcio is built without vsock support, and every address serves ttrpc as well as gRPC.
"""

from __future__ import annotations

import socket

from agent.config import Address


def vsock_listener(addr: Address, backlog: int = 128) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise OSError(f"{addr}: this Python has no AF_VSOCK")
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((addr.cid, addr.port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
