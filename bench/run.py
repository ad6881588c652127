"""``make bench``: every measurement side by side, in one run, on this machine.

Usage::

    .venv/bin/python -m bench.run                 # everything (~15-25 minutes)
    .venv/bin/python -m bench.run --only he,plain # a subset; merged into results.json
    .venv/bin/python -m bench.run --quick         # smoke (make bench-smoke), results-quick.json

Each section measures ours against a baseline taken in the same run and
reports the ratio; ``bench/results.json`` gets the issue's keys (and the
baseline figures, prefixed ``baseline_``) plus per-section details.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import Row, Section

__all__ = ["SECTIONS", "main"]

#: name -> module with ``run(quick: bool) -> Section``, in running order.
SECTIONS: dict[str, str] = {
    "he": "bench.he_path",
    "plain": "bench.plain_agg",
    "dp": "bench.dp_step",
    "levers": "bench.levers",
    "round": "bench.round_overhead",
    "scale": "bench.sim_scale",
    "big": "bench.big_model",
    "lora": "bench.lora",
    "secagg": "bench.secagg",
    "deploy": "bench.deploy_latency",
}
RESULTS = Path(__file__).resolve().parent / "results.json"
QUICK_RESULTS = RESULTS.with_name("results-quick.json")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.3g}"
    return f"{value:.3f}"


def _table(rows: list[Row]) -> Table:
    table = Table(title="fedvault bench (ours vs in-run baseline)")
    for col in ("metric", "ours", "baseline", "unit", "ratio", "target", "result"):
        table.add_column(col, justify="left" if col in ("metric", "target") else "right")
    for row in rows:
        ratio = row.ratio
        if ratio is not None and row.higher_is_better:
            ratio_text = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        else:
            ratio_text = "-" if ratio is None else f"{ratio:.3g}x"
        result = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: ""}[row.passed]
        table.add_row(
            row.metric,
            _fmt(row.ours),
            _fmt(row.baseline),
            row.unit,
            ratio_text,
            row.target,
            result,
        )
    return table


def _machine() -> dict[str, Any]:
    import numpy as np
    import tenseal
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "tenseal": tenseal.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        # The machine is shared: the load says how far to trust absolute timings.
        "load_average_1_5_15": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: every section's code path at its smallest size, targets not judged",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results file (default {RESULTS.name}, or {QUICK_RESULTS.name} with --quick)",
    )
    args = parser.parse_args(argv)
    # A smoke run must never overwrite the measured results.
    args.out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    console = Console(width=max(140, Console().width))
    results: dict[str, Any] = {}
    if args.out.exists() and args.only:
        results = json.loads(args.out.read_text())  # a partial run updates the file
    results.setdefault("details", {})
    rows: list[Row] = []
    failed: list[str] = []
    for name in names:
        console.print(f"[bold]measuring {name}[/bold] …")
        start = time.perf_counter()
        try:
            section: Section = importlib.import_module(SECTIONS[name]).run(quick=args.quick)
        except Exception as exc:  # one broken section must not lose the others' results
            console.print_exception(max_frames=5)
            section = Section(name=name, details={"error": f"{type(exc).__name__}: {exc}"})
            section.rows = [Row(f"{name}: section failed ({type(exc).__name__})", None)]
            failed.append(name)
        elapsed = time.perf_counter() - start
        results.update(section.keys)
        results["details"][name] = {
            **section.details,
            "elapsed_s": elapsed,
            "load_average_after": list(os.getloadavg()),
        }
        rows.extend(section.rows)
        console.print(f"  done in {elapsed:.1f} s")
        # Write after every section so a long run leaves its results behind.
        results["machine"] = _machine()
        results["quick"] = args.quick
        results["failed_sections"] = failed  # this run's, so far (the smoke test reads it)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    console.print(_table(rows))
    console.print(f"results written to {args.out}")
    if failed:
        console.print(f"[bold red]section(s) {failed} raised: the bench failed[/bold red]")
    return results


if __name__ == "__main__":
    # A section that raises fails the run (after the table): a bench that crashes
    # must not look like one that merely missed a target.
    sys.exit(1 if main(sys.argv[1:])["failed_sections"] else 0)
