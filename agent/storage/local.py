"""``local``: a plain directory at the mount point (no mount), with ``mode=OCTAL`` from options
(default 0777) and fs_group ownership. It is removed with its content when the last user goes."""

from __future__ import annotations

import os

from agent.errors import InvalidArgument

DEFAULT_MODE = 0o777


def _mode(storage, what: str) -> int:
    mode = DEFAULT_MODE
    for opt in storage.options:
        for part in opt.split(","):
            key, _, value = part.partition("=")
            if key != "mode":
                continue
            try:
                mode = int(value, 8)
            except ValueError:
                raise InvalidArgument(f"{what}.options: mode={value!r} is not an octal mode") from None
            if not 0 <= mode <= 0o7777:
                raise InvalidArgument(f"{what}.options: mode={value} out of range")
    return mode


class Local:
    name = "local"
    mounts = False

    def check(self, ctx, storage, what: str) -> None:
        _mode(storage, what)

    async def mount(self, ctx, storage, target: str, what: str) -> None:
        os.chmod(target, _mode(storage, what))
