"""Shared test set-up: the repo root on sys.path, and helpers every suite may use."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "host-client"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
