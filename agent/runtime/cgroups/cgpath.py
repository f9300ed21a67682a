"""Linux.CgroupsPath -> a relative path below a hierarchy's root. Pure: no file system access.

Accepted forms:
- ``/a/b``: absolute, relative to the root of every hierarchy (as runc does).
- ``a/b``: relative; taken below the hierarchy root too (the agent itself lives in the root cgroup
  of its VM, so "relative to our own cgroup" and "relative to the root" are the same there).
- ``slice:prefix:name`` (systemd style, as the Kata runtime sends with the systemd driver):
  ``system.slice:kata_agent:abc`` -> ``system.slice/kata_agent-abc.scope``; a nested slice
  ``a-b.slice`` expands to ``a.slice/a-b.slice``; an empty slice means ``system.slice``.
- empty: ``kata_agent/<owner>``.
"""

from __future__ import annotations

import re

from agent.errors import InvalidArgument

FIELD = "OCI.Linux.CgroupsPath"
DEFAULT_PARENT = "kata_agent"
_SYSTEMD = re.compile(r"^([^:/]*):([^:/]*):([^:/]+)$")
_MAX_COMPONENT = 255


def _check_component(part: str, field: str) -> None:
    if part in (".", ".."):
        raise InvalidArgument(f"{field}: {part!r} is not allowed in a cgroup path")
    if len(part) > _MAX_COMPONENT:
        raise InvalidArgument(f"{field}: component longer than {_MAX_COMPONENT} characters")
    if any(c in part for c in "\0\n"):
        raise InvalidArgument(f"{field}: NUL or newline in the path")


def expand_slice(slice_name: str, field: str = FIELD) -> list[str]:
    """``a-b-c.slice`` -> ``[a.slice, a-b.slice, a-b-c.slice]``; ``-.slice`` (the root) -> []."""
    if slice_name in ("", "-.slice"):
        return []
    if not slice_name.endswith(".slice"):
        raise InvalidArgument(f"{field}: systemd slice {slice_name!r} must end with .slice")
    stem = slice_name[: -len(".slice")]
    parts = stem.split("-")
    if not stem or any(p == "" for p in parts):
        raise InvalidArgument(f"{field}: invalid systemd slice name {slice_name!r}")
    return [("-".join(parts[: i + 1])) + ".slice" for i in range(len(parts))]


def _systemd(match: re.Match[str], field: str) -> list[str]:
    slice_name, prefix, name = match.groups()
    parents = expand_slice(slice_name or "system.slice", field)
    if name.endswith(".slice"):
        unit = name
    else:
        unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return parents + [unit]


def is_systemd_style(path: str) -> bool:
    m = _SYSTEMD.match(path)
    return bool(m) and (m.group(1) == "" or m.group(1).endswith(".slice"))


def resolve(path: str, owner: str, field: str = FIELD) -> str:
    """The normalized relative path (``a/b``, no leading slash) for a Linux.CgroupsPath."""
    if path == "":
        parts = [DEFAULT_PARENT, owner]
    elif is_systemd_style(path):
        parts = _systemd(_SYSTEMD.match(path), field)  # type: ignore[arg-type]
    else:
        parts = [p for p in path.split("/") if p != ""]
    if not parts:
        raise InvalidArgument(f"{field}: {path!r} names the root cgroup")
    for part in parts:
        _check_component(part, field)
    return "/".join(parts)
