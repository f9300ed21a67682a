"""Where a guest booted by qemu/ records its agent address (and how to find it)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile


def state_dir() -> pathlib.Path:
    """$XDG_RUNTIME_DIR/kata-agent-py, else /tmp/kata-agent-py (qemu/ writes guest.json there)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return pathlib.Path(base or tempfile.gettempdir()) / "kata-agent-py"


def guest_file() -> pathlib.Path:
    return state_dir() / "guest.json"


def read_guest() -> dict | None:
    try:
        info = json.loads(guest_file().read_text())
    except (OSError, ValueError):
        return None
    pid = info.get("pid")
    if pid:
        try:
            os.kill(int(pid), 0)
        except (OSError, ValueError):
            return None
    return info


def guest_addr() -> str | None:
    info = read_guest()
    return info.get("addr") if info else None
