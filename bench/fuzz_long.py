"""The long fuzz run: tests/integration/test_fuzz_agent.py with many examples per method.

    .venv/bin/python bench/fuzz_long.py --examples 500          # about 10 minutes on 2 cores
    .venv/bin/python bench/fuzz_long.py --examples 2000 -k CreateContainer

Prints, per protocol (ttrpc and gRPC), method and kind (message or raw bytes), how many inputs were sent and which status
codes came back, then pytest's verdict. Extra arguments after the flags go to pytest.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=500, help="examples per method and kind")
    ap.add_argument("--json", help="write the per-method counts here")
    args, rest = ap.parse_known_args()
    stats = pathlib.Path(tempfile.mkstemp(prefix="fuzz-stats-", suffix=".jsonl")[1])
    env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "FUZZ_STATS": str(stats)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "timeout=0",
           str(ROOT / "tests/integration/test_fuzz_agent.py"), *rest]
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    table: dict = collections.defaultdict(collections.Counter)
    total = 0
    for line in stats.read_text().splitlines():
        row = json.loads(line)
        table[(row.get("proto", "grpc"), row["method"], row["kind"])][row["code"]] += row["n"]
        total += row["n"]
    stats.unlink()
    for (proto, method, kind), codes in sorted(table.items()):
        print(f"{proto:5} {method:32} {kind:8} {sum(codes.values()):6}  " +
              " ".join(f"{c}={n}" for c, n in codes.most_common()))
    print(f"total inputs: {total}; pytest exit code {rc}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            {"total": total, "pytest_rc": rc,
             "methods": {f"{p}/{m}/{k}": dict(c) for (p, m, k), c in sorted(table.items())}}, indent=2) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
