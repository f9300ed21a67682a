"""Compile protos/ and describe them in the shape of tests/data/kata-wire-contract.json."""

from __future__ import annotations

import json
import pathlib
import tempfile

from google.protobuf import descriptor_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "tests" / "data" / "kata-wire-contract.json"
PROTOS = ROOT / "protos"

_TYPES = {v: k[len("TYPE_"):].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
_LABELS = {v: k[len("LABEL_"):].lower() for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()}


def load_contract() -> dict:
    return json.loads(CONTRACT.read_text())


def compile_protos() -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "set.pb"
        files = sorted(p.name for p in PROTOS.glob("*.proto"))
        rc = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", "--include_imports",
                          f"--descriptor_set_out={out}", *files])
        assert rc == 0, "protoc failed on protos/"
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def describe(fds: descriptor_pb2.FileDescriptorSet) -> dict:
    """messages/enums/services of packages grpc and types, as the contract JSON lists them."""
    out: dict = {"messages": {}, "enums": {}, "services": {}}

    def walk_enum(prefix: str, e) -> None:
        out["enums"][f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}

    def walk_msg(prefix: str, m) -> None:
        name = f"{prefix}.{m.name}"
        fields = {}
        for f in m.field:
            entry = {"label": _LABELS[f.label], "number": f.number, "type": _TYPES[f.type]}
            if f.type_name:
                entry["type_name"] = f.type_name.lstrip(".")
            fields[f.name] = entry
        out["messages"][name] = fields
        for nested in m.nested_type:
            walk_msg(name, nested)
        for e in m.enum_type:
            walk_enum(name, e)

    for f in fds.file:
        if f.package not in ("grpc", "types"):
            continue
        for m in f.message_type:
            walk_msg(f.package, m)
        for e in f.enum_type:
            walk_enum(f.package, e)
        for s in f.service:
            out["services"][f"{f.package}.{s.name}"] = {
                meth.name: {"input": meth.input_type.lstrip("."), "output": meth.output_type.lstrip(".")}
                for meth in s.method}
    return out


def differences(expected: dict, actual: dict, path: str = "") -> list[str]:
    """Every key missing, extra or different between two nested dicts, as readable lines."""
    if not isinstance(expected, dict) or not isinstance(actual, dict):
        return [] if expected == actual else [f"{path}: expected {expected!r}, got {actual!r}"]
    diffs = []
    for key in sorted(set(expected) | set(actual)):
        where = f"{path}.{key}" if path else key
        if key not in actual:
            diffs.append(f"{where}: missing")
        elif key not in expected:
            diffs.append(f"{where}: not in the contract")
        else:
            diffs.extend(differences(expected[key], actual[key], where))
    return diffs
