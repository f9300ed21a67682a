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


def require_abs(path: str, where: str) -> None:
    """An absolute path without NUL bytes; ``where`` names the field."""
    if not path:
        raise InvalidArgument(f"{where}: empty")
    if not path.startswith("/"):
        raise InvalidArgument(f"{where}: {path!r} not absolute")
    if "\0" in path:
        raise InvalidArgument(f"{where}: contains a NUL byte")


def known_once(names, known, where: str, what: str) -> None:
    """Each of ``names`` (the ``Type`` of entries of list field ``where``) is in ``known``, none twice."""
    seen = set()
    for i, name in enumerate(names):
        if name not in known:
            raise InvalidArgument(f"{where}[{i}].Type: unknown {what} {name!r}")
        if name in seen:
            raise InvalidArgument(f"{where}[{i}].Type: {name} given twice")
        seen.add(name)
