"""Every command's bad input: exactly one ``error:`` line on stderr and exit code 2.

Run through the real command line in a subprocess (``python -m fedvault``), as a
script or an operator meets it; plus ``--json`` output, which scripts parse.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedvault.app.provision import provision
from fedvault.config import JobConfig
from fedvault.coordinator.records import HospitalEval, ModelBlob, Participation, RoundCommit
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.coordinator.superlink import ControlApiError
from fedvault.errors import (
    BudgetExhaustedError,
    DataError,
    FedvaultError,
    InvalidConfigError,
    StoreError,
)
from fedvault.task_registry import describe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "consortium.toml"


def _fedvault(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedvault", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Kits, a bad TOML, a job with an unknown task, a good job, a non-empty directory."""
    root = tmp_path_factory.mktemp("cli-errors")
    provision(EXAMPLE, root / "kits")
    bad = root / "bad.toml"
    bad.write_text("[job\nname = ")
    unknown = root / "unknown-task.toml"
    unknown.write_text(
        '[job]\nname = "j"\ntask = "no_such_module:TASK"\nhospitals = 2\nrounds = 1\n'
    )
    good = root / "job.toml"
    good.write_text('[job]\nname = "j"\ntask = "breast-cancer"\nhospitals = 2\nrounds = 1\n')
    full = root / "full"
    full.mkdir()
    (full / "x").write_text("x")
    return {
        "root": root,
        "coordinator": root / "kits" / "coordinator",
        "hospital": root / "kits" / "hospitals" / "hospital-a",
        "bad": bad,
        "unknown": unknown,
        "good": good,
        "full": full,
        "missing": root / "missing.toml",
    }


# (name, argv with {placeholders} from `files`, a phrase the line must contain)
CASES = [
    ("simulate-out-uncreatable", ["simulate", "--out", "/proc/x/run", "--rounds", "1"], "/proc/x"),
    (
        "coordinator-missing-job",
        ["coordinator", "start", "--kit", "{coordinator}", "--job", "{missing}"],
        "not found",
    ),
    (
        "coordinator-invalid-toml",
        ["coordinator", "start", "--kit", "{coordinator}", "--job", "{bad}"],
        "not valid TOML",
    ),
    (
        "coordinator-unknown-task",
        ["coordinator", "start", "--kit", "{coordinator}", "--job", "{unknown}"],
        "no_such_module",
    ),
    (
        "coordinator-missing-kit",
        ["coordinator", "start", "--kit", "{root}/nokit", "--job", "{good}"],
        "nokit",
    ),
    (
        "client-missing-data",
        ["client", "start", "--kit", "{hospital}", "--data", "{missing}", "--state", "{root}/c"],
        "not found",
    ),
    (
        "client-invalid-toml",
        ["client", "start", "--kit", "{hospital}", "--data", "{bad}", "--state", "{root}/c"],
        "not valid TOML",
    ),
    ("provision-invalid-toml", ["provision", "{bad}", "--out", "{root}/p"], "not valid TOML"),
    ("provision-missing-file", ["provision", "{missing}", "--out", "{root}/p2"], "missing.toml"),
    ("status-missing-kit", ["status", "--kit", "{root}/nokit", "--json"], "nokit"),
    ("model-list-no-side", ["model", "list", "--json"], "--state"),
    (
        "model-list-store-uncreatable",
        ["model", "list", "--store", "sqlite:////proc/x/s.sqlite", "--json"],
        "/proc/x",
    ),
    (
        "model-export-missing-job",
        ["model", "export", "--job", "j", "--out", "{root}/e", "--state", "{root}/nostate"],
        "holds no models of job 'j'",
    ),
    ("audit-verify-store", ["audit", "verify", "--store", "sqlite:////proc/x/s.sqlite"], "/proc/x"),
    ("task-show-unknown", ["task", "show", "no_such_module:TASK"], "no_such_module"),
    ("demo-out-not-empty", ["demo", "--out", "{full}"], "not empty"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "argv", "phrase"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(
    files: dict[str, Path], name: str, argv: list[str], phrase: str
) -> None:
    done = _fedvault(*(a.format(**{k: str(v) for k, v in files.items()}) for a in argv))
    assert done.returncode == 2, (name, done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, (name, done.stderr)
    assert lines[0].startswith("error: ") and phrase in lines[0], (name, lines[0])
    assert "Traceback" not in done.stderr
    assert done.stdout == "", (name, done.stdout)  # --json scripts read nothing half-written


def test_a_usage_error_exits_2() -> None:
    done = _fedvault("coordinator", "start", "--kit", "k", "--job", "j", "--log-format", "xml")
    assert done.returncode == 2, done.stderr
    assert "'xml' is not one of 'text', 'json'" in " ".join(done.stderr.split())


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidConfigError("bad option"), 2),
        (DataError("bad data"), 2),
        (StoreError("another job's store"), 2),
        (FedvaultError("the job did not finish in time"), 1),  # the work ran and failed
        (BudgetExhaustedError("budget spent"), 1),
        (ControlApiError("the SuperLink stopped answering"), 1),
    ],
)
def test_bad_input_exits_2_and_failed_work_1(exc: FedvaultError, code: int) -> None:
    from fedvault.app.cli import _exit_code

    assert _exit_code(exc) == code


def test_model_list_json_has_the_tables_information(tmp_path: Path) -> None:
    config = JobConfig.for_task(
        describe("breast-cancer"),
        hospitals=2,
        rounds=3,
        job="study",
        reference="breast-cancer",
        secure_aggregation="none",
    )
    url = sqlite_url(tmp_path / "store.sqlite")
    ok = (Participation(hospital="hospital-a", status="ok", samples=10, epsilon=0.5),)
    seen = HospitalEval(hospital="hospital-a", accuracy=0.75, loss=0.5, samples=4)
    with RoundStore(url) as store:
        job = store.open_job("study", config.to_dict())
        for number in (1, 2):
            store.commit_round(
                job.id,
                RoundCommit(
                    number=number,
                    model=ModelBlob(round=number, kind="plain", blob=b"w" * 8, total_weight=10),
                    participations=ok,
                    train_loss=0.5,
                    previous_evaluations=(seen,) if number == 2 else (),
                    previous_pooled={"accuracy": 0.75, "loss": 0.5} if number == 2 else {},
                ),
            )
    done = _fedvault("model", "list", "--store", url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "jobs": {
            "study": [
                {"round": 1, "metrics": {"accuracy": 0.75, "loss": 0.5}},
                {"round": 2, "metrics": {}},
            ]
        }
    }
    table = _fedvault("model", "list", "--store", url)
    assert "Model versions of job study" in table.stdout and "0.7500" in table.stdout
