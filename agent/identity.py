"""The guest's own identity: /etc/machine-id, kept by the agent when it is PID 1.

A cold boot writes one from the kernel's random pool when the image has none. Guests started from
one template share the template's until the host sends ReseedRandomDev, as it does after every
restore: the agent then draws a new one from the reseeded pool (``agent.guest.reseed``).
"""

from __future__ import annotations

import os
import re

MACHINE_ID = "/etc/machine-id"
_VALID = re.compile(r"^[0-9a-f]{32}$")


def read_machine_id(path: str = MACHINE_ID) -> str:
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return ""
    return value if _VALID.match(value) else ""


def write_machine_id(path: str = MACHINE_ID) -> str:
    """A new random machine-id, written atomically; returns it."""
    value = os.urandom(16).hex()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(value + "\n")
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)
    return value


def ensure_machine_id(path: str = MACHINE_ID) -> str:
    return read_machine_id(path) or write_machine_id(path)
