"""Regenerate agent/protocols/*_pb2*.py from protos/*.proto.

Run:  python protos/generate.py
The generated modules are committed; tests/unit/test_protocol.py fails when they no longer match
the .proto files. grpc_tools emits top-level imports (``import oci_pb2``); they are rewritten to
package-relative ones so the modules live inside ``agent.protocols``.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "agent" / "protocols"
PROTO_FILES = sorted(p.name for p in PROTOS.glob("*.proto"))
_IMPORT = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.M)


def well_known_include() -> str:
    import grpc_tools

    return str(pathlib.Path(grpc_tools.__file__).parent / "_proto")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known_include()}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    for path in sorted(OUT.glob("*_pb2*.py*")):
        text = path.read_text()
        fixed = _IMPORT.sub(lambda m: f"from . import {m.group(1)}{m.group(2) or ''}", text)
        if fixed != text:
            path.write_text(fixed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
