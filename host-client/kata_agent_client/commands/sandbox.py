"""create-sandbox, destroy-sandbox and copy-file."""

from __future__ import annotations

import json
import os
import stat

CHUNK = 1 << 20


def register(sub) -> None:
    p = sub.add_parser("create-sandbox", help="CreateSandbox from flags and/or a JSON request")
    p.add_argument("--json", help="a CreateSandboxRequest as JSON (flags are added to it); - reads stdin")
    p.add_argument("--hostname", default=None)
    p.add_argument("--sandbox-id", default=None)
    p.add_argument("--dns", action="append", default=[], metavar="LINE", help="resolv.conf line, repeatable")
    p.add_argument("--module", action="append", default=[], metavar="NAME[,PARAM=V...]",
                   help="kernel module to modprobe, repeatable")
    p.add_argument("--storage", action="append", default=[], metavar="JSON", help="a Storage as JSON, repeatable")
    p.add_argument("--sandbox-pidns", action="store_true")
    p.add_argument("--guest-hook-path", default=None)
    p.set_defaults(func=create_sandbox)
    p = sub.add_parser("destroy-sandbox", help="DestroySandbox")
    p.set_defaults(func=lambda args, client: client.call("DestroySandbox") and 0)
    p = sub.add_parser("copy-file", help="copy LOCAL to REMOTE (under /run/kata-containers/shared/containers/)")
    p.add_argument("local")
    p.add_argument("remote")
    p.set_defaults(func=copy_file)


def sandbox_request(args) -> dict:
    import sys

    text = sys.stdin.read() if args.json == "-" else args.json
    req = json.loads(text) if text else {}
    if args.hostname is not None:
        req["hostname"] = args.hostname
    if args.sandbox_id is not None:
        req["sandbox_id"] = args.sandbox_id
    if args.guest_hook_path is not None:
        req["guest_hook_path"] = args.guest_hook_path
    if args.sandbox_pidns:
        req["sandbox_pidns"] = True
    req.setdefault("dns", []).extend(args.dns)
    for spec in args.module:
        name, *params = spec.split(",")
        req.setdefault("kernel_modules", []).append({"name": name, "parameters": params})
    for text in args.storage:
        try:
            req.setdefault("storages", []).append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--storage {text!r}: {exc}") from None
    return req


def create_sandbox(args, client) -> int:
    client.call("CreateSandbox", sandbox_request(args))
    return 0


def copy_file(args, client) -> int:
    st = os.lstat(args.local)
    base = {"path": args.remote, "file_mode": st.st_mode, "dir_mode": 0o755,
            "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(args.local).encode()
        client.call("CopyFile", {**base, "file_size": len(target), "data": _b64(target)})
        return 0
    if stat.S_ISDIR(st.st_mode):
        client.call("CopyFile", {**base, "file_size": 0})
        return 0
    with open(args.local, "rb") as f:
        offset = 0
        while True:
            data = f.read(CHUNK)
            if not data and offset:
                return 0
            client.call("CopyFile", {**base, "file_size": st.st_size, "offset": offset, "data": _b64(data)})
            offset += len(data)
            if offset >= st.st_size:
                return 0


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
