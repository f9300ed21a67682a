"""Checks for identifiers that come from requests and later become paths or keys."""

from __future__ import annotations

import re

from agent.errors import InvalidArgument

ID_MAX = 128
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_id(value: str, field: str = "container_id", *, allow_empty: bool = False) -> str:
    """An id safe to use as one path component: ``^[A-Za-z0-9][A-Za-z0-9_.-]*$``, at most 128 chars."""
    if not value:
        if allow_empty:
            return value
        raise InvalidArgument(f"{field}: empty")
    if len(value) > ID_MAX:
        raise InvalidArgument(f"{field}: longer than {ID_MAX} characters")
    if not _ID.fullmatch(value):
        raise InvalidArgument(f"{field}: {value!r} must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    return value
