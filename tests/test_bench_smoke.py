"""``python -m bench.run --quick`` over every section: a benchmark that cannot rot.

The bench is not run in CI, so a section broke once without anyone noticing.
``--quick`` runs each section's real code path (Flower simulations, Ray
clusters, ``fedvault demo`` and a plain Flower deployment as real processes) at
its smallest size, targets not judged. A section that raises makes ``bench.run``
exit 1; a job that fails inside a section (a simulation that did not finish, a
demo that crashed) does not raise but leaves its keys ``None``, so the keys are
checked too. Timings are not asserted: only that every path ran to the end.

``make test`` runs the sections that need no Ray and no daemons (seconds); the
rest, minutes of process and Ray start-up, carry the ``bench_smoke`` marker, which
``make test`` deselects and ``make bench-smoke`` (CI, after ``make test``) runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"  # the real one, which the test must leave alone


def _sections() -> list[str]:
    """``bench.run.SECTIONS``, read from its source (``bench`` is not an installed package)."""
    tree = ast.parse((ROOT / "bench" / "run.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "SECTIONS":
            assert node.value is not None
            return list(ast.literal_eval(node.value))
    raise AssertionError("no SECTIONS in bench/run.py")


SECTIONS = _sections()
#: Sections whose smoke runs in seconds, in this process's machine, with no Ray, no
#: simulation and no daemons: ``make test`` runs these; ``make bench-smoke`` (CI,
#: after ``make test``) runs every section.
IN_PROCESS = ("he", "plain", "dp", "levers")
FAST_TIMEOUT_S = 300
# ~5 minutes on an idle 2-core machine (bench/README.md); generous for a loaded one.
RUN_TIMEOUT_S = 1700

#: Keys each section must write with a finite number, when every job of it ran.
REQUIRED: dict[str, tuple[str, ...]] = {
    "he": ("he_aggregate_10x1M_s", "he_expansion", "he_max_abs_error"),
    "plain": ("plain_aggregate_ratio",),
    "dp": (
        "dp_step_ratio_digits_cnn",
        "dp_step_ratio_digits_cnn_b64",
        "dp_step_ratio_mlp",
        "dp_step_ratio_secure_rng_digits_cnn",
        "secure_rng_vs_fast_noise_1m",
    ),
    "levers": ("lever_fixed_point", "lever_bfv_symmetric_seeded", "lever_accumulate"),
    "round": ("round_overhead_ratio", "round_serverapp_ratio_5"),
    "scale": ("max_sim_hospitals", "ray_cluster_hospital_rounds_per_s_2"),
    # Each of these needs its jobs to have finished: the DP+HE, DP and plain MLP jobs
    # and the many-hospital coordinator job.
    "big": ("big_round_ratio", "big_hospital_mem_ratio", "big_coordinator_ratio"),
    "lora": ("lora_accuracy", "lora_baseline_accuracy", "lora_shared_params"),
    "secagg": (
        "secagg_hospital_ratio",
        "secagg_bytes_ratio",
        "secagg_correction_ratio",
        "secagg_correction_ratio_dropped",
        "secagg_round_ratio",
        "crypto_noise_step_ratio",
    ),
    "deploy": ("deploy_round_ratio",),
}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _number(value: Any) -> bool:
    if isinstance(value, dict):  # a lever's figures
        return bool(value) and all(_number(v) for v in value.values() if not isinstance(v, str))
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _run_quick(out: Path, sections: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
    """``bench.run --quick`` of ``sections`` (all: empty) into ``out``; its results."""
    before = _digest(RESULTS)
    only = ["--only", ",".join(sections)] if sections else []
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out), *only],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    tail = f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-4000:]}"
    if _digest(RESULTS) != before:  # another bench may run on a shared machine: not a quick one
        assert json.loads(RESULTS.read_text()).get("quick") is not True, "wrote the real results"
    assert out.is_file(), f"no results file (exit {proc.returncode})\n{tail}"
    results: dict[str, Any] = json.loads(out.read_text())
    results["_returncode"], results["_tail"] = proc.returncode, tail
    return results


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_quick(tmp_path_factory.mktemp("bench") / "results.json", (), RUN_TIMEOUT_S)


@pytest.mark.timeout(FAST_TIMEOUT_S + 60)
def test_the_in_process_sections_run_in_make_test(tmp_path: Path) -> None:
    """Every ``make test`` smokes the sections that need no Ray and no daemons."""
    results = _run_quick(tmp_path / "results.json", IN_PROCESS, FAST_TIMEOUT_S)
    _assert_sections_ran(results, IN_PROCESS)
    missing = {name: _missing_keys(results, name) for name in IN_PROCESS}
    assert not any(missing.values()), f"keys missing or null: {missing}"


def _assert_sections_ran(results: dict[str, Any], names: Sequence[str]) -> None:
    """The run exited 0, no section raised, and each of ``names`` left error-free details."""
    assert results["failed_sections"] == [], results["_tail"]
    assert results["_returncode"] == 0, results["_tail"]
    assert results["quick"] is True
    for name in names:
        details = results["details"].get(name)
        assert details is not None, f"section {name} left no details"
        assert "error" not in details, f"section {name}: {details.get('error')}"


def _missing_keys(results: dict[str, Any], name: str) -> list[str]:
    """Section ``name``'s required keys that are missing or not a finite number."""
    return [key for key in REQUIRED[name] if not _number(results.get(key))]


@pytest.mark.bench_smoke
@pytest.mark.timeout(RUN_TIMEOUT_S + 100)
def test_every_section_runs(quick: dict[str, Any]) -> None:
    _assert_sections_ran(quick, SECTIONS)


@pytest.mark.bench_smoke
@pytest.mark.timeout(RUN_TIMEOUT_S + 100)
def test_every_section_writes_its_keys(quick: dict[str, Any]) -> None:
    assert set(REQUIRED) == set(SECTIONS), "a section was added: say which keys it must write"
    missing = {name: keys for name in REQUIRED if (keys := _missing_keys(quick, name))}
    shown = {name: quick["details"].get(name) for name in missing}
    assert not missing, f"keys missing or null: {missing}\n{json.dumps(shown, default=str)[:6000]}"
    assert quick["max_sim_hospitals"] > 0


@pytest.mark.bench_smoke
@pytest.mark.timeout(RUN_TIMEOUT_S + 100)
def test_every_job_inside_a_section_finished(quick: dict[str, Any]) -> None:
    """Jobs whose failure leaves no key behind: the clusters and the simulated secagg jobs."""
    scale = quick["details"]["scale"]
    clusters = {k: v for k, v in scale.items() if k.startswith("cluster_")}
    assert clusters, "the scale section ran no Ray cluster"
    for name, result in clusters.items():
        assert result.get("status") == "finished", f"{name}: {result}"
    assert all(a["ok"] for a in scale["attempts"]), scale["attempts"]
    lever = scale["patched_attempts"]  # the what-if patches, on the same small job
    assert lever and all(a["ok"] for a in lever), lever
    jobs = quick["details"]["secagg"]["simulation"]["jobs"]
    for kind, runs in jobs.items():
        assert runs and all(r["ok"] for r in runs), f"secagg {kind}: {runs}"
    deploy = quick["details"]["deploy"]["runs"]
    for config, runs in deploy.items():
        assert runs and all(r.get("ok") for r in runs), f"deploy {config}: {runs}"
