"""OCI hooks, in one place: the container's (from its spec), the guest's (found under a sandbox's
``guest_hook_path``), and running them with the container state on stdin.

The runtime runs them in the agent's namespaces (agent.runtime.container): Prestart and
CreateRuntime once the init waits in its rootfs, Poststart after the start, Poststop at removal.
CreateContainer and StartContainer hooks would run inside the container's namespaces: refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from agent.errors import FailedPrecondition, InvalidArgument
from agent.protocols import oci_pb2
from agent.runtime import command
from agent.validate import require_abs

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
# The guest's hook directories, by stage (Kata's layout: ``STAGE/*``).
GUEST_STAGES = ("prestart", "poststart", "poststop")


@dataclass
class Hook:
    path: str
    args: list[str]  # argv, its first word included
    env: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class Hooks:
    prestart: list[Hook] = field(default_factory=list)
    create_runtime: list[Hook] = field(default_factory=list)
    poststart: list[Hook] = field(default_factory=list)
    poststop: list[Hook] = field(default_factory=list)

    def extend(self, other: Hooks) -> None:
        """Add ``other``'s hooks after ours, stage by stage."""
        for name in ("prestart", "create_runtime", "poststart", "poststop"):
            getattr(self, name).extend(getattr(other, name))


# The hooks the runtime runs at each point of a container's life, with their stage's OCI name.
AT = {"create": (("prestart", "prestart"), ("create_runtime", "createRuntime")),
      "start": (("poststart", "poststart"),),
      "remove": (("poststop", "poststop"),)}


def _hook(path: str, args: list[str], env: list[str], timeout: int, where: str) -> Hook:
    """A checked hook; ``where`` names it in errors."""
    require_abs(path, f"{where}.Path")
    if timeout < 0:
        raise InvalidArgument(f"{where}.Timeout: {timeout} is negative")
    for j, env_var in enumerate(env):
        if "=" not in env_var or "\0" in env_var:
            raise InvalidArgument(f"{where}.Env[{j}]: {env_var!r} is not NAME=VALUE")
    return Hook(path, list(args) or [path], list(env), float(timeout or DEFAULT_TIMEOUT))


def convert(spec_hooks: oci_pb2.Hooks) -> Hooks:
    """The hooks of a spec (``OCI.Hooks``), checked; InvalidArgument names the field."""
    for name in ("CreateContainer", "StartContainer"):
        if getattr(spec_hooks, name):
            raise InvalidArgument(f"OCI.Hooks.{name}: hooks that run inside the container's namespaces "
                                  "are not supported")
    out = Hooks()
    for name, into in (("Prestart", out.prestart), ("CreateRuntime", out.create_runtime),
                       ("Poststart", out.poststart), ("Poststop", out.poststop)):
        for i, h in enumerate(getattr(spec_hooks, name)):
            into.append(_hook(h.Path, list(h.Args), list(h.Env), h.Timeout, f"OCI.Hooks.{name}[{i}]"))
    return out


# --- the guest's hooks --------------------------------------------------------------------------

def _hook_from_json(path: str) -> tuple[list[str], Hook]:
    with open(path) as f:
        data = json.load(f)
    body = data.get("hook", data)
    if not isinstance(body, dict) or not isinstance(body.get("path"), str):
        raise InvalidArgument(f"guest_hook_path: {path}: no hook path")
    hook = _hook(body["path"], body.get("args") or [body["path"]], body.get("env") or [],
                 int(body.get("timeout") or 0), f"guest_hook_path: {path}: hook")
    return list(data.get("stages") or []), hook


def scan(root: str) -> Hooks:
    """Hooks under ``root``: ``STAGE/*`` executables (Kata's layout) and OCI hook JSON files
    (``STAGE/*.json``, or ``*.json`` naming their ``stages``)."""
    found = Hooks()
    stages = {s: getattr(found, s) for s in GUEST_STAGES}
    if not os.path.isdir(root):
        log.warning("guest_hook_path %s is not a directory; no guest hooks", root)
        return found
    for name in sorted(os.listdir(root)):
        if name.endswith(".json"):
            names, hook = _hook_from_json(os.path.join(root, name))
            for stage in names:
                if stage in stages:
                    stages[stage].append(hook)
    for stage in GUEST_STAGES:
        folder = os.path.join(root, stage)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if name.endswith(".json"):
                stages[stage].append(_hook_from_json(path)[1])
            elif os.path.isfile(path) and os.access(path, os.X_OK):
                stages[stage].append(Hook(path, [path, stage]))
    return found


# --- running them -------------------------------------------------------------------------------

async def run(hooks: list[Hook], state: dict, stage: str) -> None:
    """Run ``hooks`` with the container state on stdin; a failing prestart/poststart hook raises,
    a failing poststop hook is logged (runtime-spec)."""
    for hook in hooks:
        argv = [hook.path, *hook.args[1:]]
        env = dict(e.split("=", 1) for e in hook.env if "=" in e)
        try:
            done = await command.run(argv, input=json.dumps(state).encode(), timeout=hook.timeout, env=env)
            failure = done.error_text() if done.returncode else ""
        except (OSError, TimeoutError) as exc:
            failure = str(exc)
        if failure:
            if stage == "poststop":
                log.warning("poststop hook failed", extra={"fields": {"hook": hook.path, "error": failure}})
                continue
            raise FailedPrecondition(f"{stage} hook {hook.path}: {failure}")
