"""Regenerate agent/protocols/*_pb2*.py from protos/*.proto, and the containerd shim's
kata_agent_client/shim/protocols/*_pb2.py from protos/containerd/*.proto.

Run:  python protos/generate.py
The generated modules are committed; tests/unit/test_protocol.py fails when they no longer match
the .proto files. grpc_tools emits top-level imports (``import oci_pb2``); they are rewritten to
package-relative ones so the modules live inside their package. The containerd set gets no gRPC
stubs: the shim speaks ttrpc only.
"""

from __future__ import annotations

import pathlib
import re
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "agent" / "protocols"
CONTAINERD_PROTOS = PROTOS / "containerd"
CONTAINERD_OUT = ROOT / "host-client" / "kata_agent_client" / "shim" / "protocols"
_IMPORT = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.M)


def well_known_include() -> str:
    import grpc_tools

    return str(pathlib.Path(grpc_tools.__file__).parent / "_proto")


def generate(src: pathlib.Path, out: pathlib.Path, grpc: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{src}", f"-I{well_known_include()}", f"--python_out={out}", f"--pyi_out={out}"]
    if grpc:
        args.append(f"--grpc_python_out={out}")
    args += sorted(p.name for p in src.glob("*.proto"))
    if protoc.main(args) != 0:
        print(f"protoc failed on {src}", file=sys.stderr)
        return 1
    for path in sorted(out.glob("*_pb2*.py*")):
        text = path.read_text()
        fixed = _IMPORT.sub(lambda m: f"from . import {m.group(1)}{m.group(2) or ''}", text)
        if fixed != text:
            path.write_text(fixed)
    return 0


def main() -> int:
    return generate(PROTOS, OUT, grpc=True) or generate(CONTAINERD_PROTOS, CONTAINERD_OUT, grpc=False)


if __name__ == "__main__":
    raise SystemExit(main())
