"""Bad input on the command line: one line naming the problem, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedvault.app.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--example", "mnist"], "unknown task 'mnist'"),
        (["--partition", "dirichlet:x"], "bad partition 'dirichlet:x'"),
        (["--partition", "zipf"], "bad partition 'zipf'"),
        (["--epsilon", "0"], "epsilon"),
        (["--epsilon", "-1"], "epsilon"),
        (["--delta", "1"], "delta"),
        (["--rounds", "0"], "rounds must be an integer >= 1"),
        (["--hospitals", "0"], "hospitals must be an integer >= 1"),
        (["--secure-aggregation", "rot13"], "unknown secure aggregation mode 'rot13'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["simulate", *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert needle in lines[0]
    assert not out.exists()


def test_unwritable_out_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    result = runner.invoke(app, ["simulate", "--out", str(blocker / "run"), "--rounds", "1"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1
    assert "--out" in result.output and "not a directory" in result.output
    assert blocker.read_text() == "x"


def test_print_summary_reads_the_typed_report() -> None:
    import io

    from rich.console import Console

    from fedvault.app.cli import print_summary
    from fedvault.coordinator.report import Report

    report = Report.from_json(
        {
            "config": {},
            "rounds": [
                {
                    "round": 1,
                    "accuracy": 0.9,
                    "loss": 0.3,
                    "metrics": {"accuracy": 0.9, "auroc": 0.95, "loss": 0.3},
                    "epsilon": {"hospital-1": 0.25},
                    "participants": ["hospital-1"],
                    "bytes_received": 12345,
                }
            ],
            "final": {
                "accuracy": 0.9,
                "metrics": {"accuracy": 0.9, "auroc": 0.95, "loss": 0.3},
                "epsilon_max": 0.25,
                "delta": 1e-5,
                "rounds_completed": 1,
                "status": "finished",
            },
            "hospitals": {
                "hospital-1": {
                    "samples": 120,
                    "noise_multiplier": 1.1,
                    "sample_rate": 0.05,
                    "steps": 40,
                    "accountant": "prv",
                    "epsilon": 0.25,
                    "delta": 1e-5,
                },
                # Refused before it ever trained: no ledger entry, every value unknown.
                "hospital-2": {},
            },
        }
    )
    console = Console(record=True, width=200, file=io.StringIO())
    print_summary(report, console, Path("/runs/x"))
    text = console.export_text()
    assert "12,345" in text and "0.9500" in text and "0.250" in text
    assert "final accuracy 0.9000   auroc 0.9500   max ε 0.250 at δ=1e-05" in text
    assert "rounds 1   status finished" in text
    assert "report: /runs/x/report.json" in text
    row = next(line for line in text.splitlines() if "hospital-2" in line)
    assert row.count("n/a") == 6, row  # samples, ε, σ, sample rate, steps, accountant
