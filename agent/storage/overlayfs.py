"""``overlayfs``: an overlay of ``lowerdir=A:B``, ``upperdir=`` and ``workdir=`` given in options.

Every directory named must lie under /run/kata-containers/ (symlinks resolved); upperdir and
workdir are created when missing (and removed again if the mount fails).
"""

from __future__ import annotations

import os

from agent.errors import InvalidArgument
from agent.storage import paths
from agent.storage.base import MountDriver
from agent.storage.syscalls import MountOptions, mount

LAYER_KEYS = ("lowerdir", "upperdir", "workdir")


def _layers(ctx, opts: MountOptions, what: str) -> tuple[dict[str, list[str]], list[str]]:
    layers: dict[str, list[str]] = {}
    rest: list[str] = []
    for item in filter(None, opts.data.split(",")):
        key, _, value = item.partition("=")
        if key not in LAYER_KEYS:
            rest.append(item)
            continue
        dirs = []
        for d in value.split(":") if key == "lowerdir" else [value]:
            mapped = paths.map_run_dir(d, ctx.run_dir)
            paths.lexical_under(mapped, ctx.kata_root, f"{what}.options {key}")
            dirs.append(mapped)
        layers[key] = dirs
    if "lowerdir" not in layers:
        raise InvalidArgument(f"{what}.options: lowerdir= is required")
    if ("upperdir" in layers) != ("workdir" in layers):
        raise InvalidArgument(f"{what}.options: upperdir= and workdir= go together")
    return layers, rest


class Overlay(MountDriver):
    name = "overlayfs"

    def check(self, ctx, storage, what: str) -> None:
        _layers(ctx, self.options(storage), what)

    async def mount(self, ctx, storage, target: str, what: str) -> list[str]:
        opts = self.options(storage)
        layers, rest = _layers(ctx, opts, what)
        created: list[str] = []
        try:
            for key in ("upperdir", "workdir"):
                for d in layers.get(key, []):
                    created += paths.ensure_dirs(ctx.kata_root, d, f"{what}.options {key}")
            for key, dirs in layers.items():
                for d in dirs:
                    if not os.path.isdir(d):
                        raise InvalidArgument(f"{what}.options {key}: {d!r} is not a directory")
                    paths.real_under(d, ctx.kata_root, f"{what}.options {key}")
            data = [f"{k}={':'.join(v)}" for k, v in layers.items()] + rest
            mount("overlay", target, "overlay", opts.flags, ",".join(data))
        except BaseException:
            paths.remove_dirs(created)
            raise
        return created
