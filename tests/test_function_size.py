"""No function in the product packages is longer than 80 lines.

Counted from the ``def`` line to the function's last line, docstring included.
Benchmarks (``bench/``), database migrations, generated protobuf modules and
the stand-alone task-package example are not product code and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


def _sources() -> list[Path]:
    found = list((ROOT / "examples").glob("*.py"))  # not the task-package below it
    for folder in ("fedvault", "privacy", "coordinator", "client"):
        found += (ROOT / folder).rglob("*.py")
    return sorted(
        p
        for p in found
        if "migrations" not in p.relative_to(ROOT).parts
        and not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    )


def test_no_function_is_longer_than_80_lines() -> None:
    assert _sources(), "no sources found"
    too_long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)"
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_LINES
    ]
    assert not too_long, "split these functions into helpers:\n" + "\n".join(too_long)
