"""Bad input on the command line: one line naming the problem, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedvault.cli import app

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
