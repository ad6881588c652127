"""Site policy: the file format, its validation, and each refusal rule with its reason."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from fedvault.client.policy import POLICY_FILE, AllowedTask, SitePolicy, write_policy
from fedvault.errors import InvalidConfigError, PolicyRefusalError

FP_OK = "sha256:" + "ab" * 32
FP_OTHER = "sha256:" + "cd" * 32

# A job every rule of _policy() allows; each refusal case changes one field.
JOB: dict[str, Any] = {
    "task": "oncology-mlp",
    "version": "0.1.0",
    "fingerprint": FP_OK,
    "epsilon": 3.0,
    "delta": 1e-5,
    "records": 50,
    "spent_elsewhere": 7.0,
}

FULL = """
# fedvault site policy: what this hospital agrees to train.
[limits]
max_epsilon_per_job = 3.0
max_epsilon_total = 10.0
max_delta = 1e-5
min_records = 50

[[tasks]]
name = "oncology-mlp"
versions = ["0.1.0", "0.2.0"]
fingerprints = ["{fp}"]

[[tasks]]
name = "cardiology-cnn"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def _policy(tmp_path: Path) -> SitePolicy:
    return SitePolicy.load(_write(tmp_path, FULL.replace("{fp}", FP_OK)))


def test_full_file_loads(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    assert policy.source == tmp_path / "policy.toml"
    assert policy.tasks == (
        AllowedTask("oncology-mlp", ("0.1.0", "0.2.0"), (FP_OK,)),
        AllowedTask("cardiology-cnn"),
    )
    assert (policy.max_epsilon_per_job, policy.max_epsilon_total) == (3.0, 10.0)
    assert (policy.max_delta, policy.min_records) == (1e-5, 50)


def test_limits_are_optional(tmp_path: Path) -> None:
    policy = SitePolicy.load(_write(tmp_path, '[[tasks]]\nname = "t"\n'))
    assert policy.max_epsilon_per_job is policy.max_epsilon_total is policy.max_delta is None
    assert policy.min_records == 1
    policy.check(task="t", version="9", fingerprint="x", epsilon=1e6, delta=0.5, records=1)


def test_integer_limits_become_floats(tmp_path: Path) -> None:
    policy = SitePolicy.load(_write(tmp_path, "[limits]\nmax_epsilon_per_job = 3\n"))
    assert policy.max_epsilon_per_job == 3.0
    assert isinstance(policy.max_epsilon_per_job, float)


@pytest.mark.parametrize(
    "change",
    [
        {},  # exactly at every limit
        {"version": "0.2.0"},
        {"epsilon": 0.5, "delta": 1e-7, "records": 10_000, "spent_elsewhere": 0.0},
        {"delta": 0.0},  # pure ε-DP
        {"task": "cardiology-cnn", "version": "7", "fingerprint": "anything"},
    ],
    ids=["at-limits", "second-version", "well-within", "delta-0", "unpinned-task"],
)
def test_allowed_jobs_pass(tmp_path: Path, change: dict[str, Any]) -> None:
    _policy(tmp_path).check(**{**JOB, **change})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"task": "dermatology-vit"},
            [
                "does not allow task 'dermatology-vit'",
                "allowed: oncology-mlp, cardiology-cnn",
                "[[tasks]]",
                'name = "dermatology-vit"',
            ],
        ),
        (
            {"version": "0.3.0"},
            ["'oncology-mlp'", "version '0.3.0'", "0.1.0, 0.2.0", "versions"],
        ),
        (
            {"fingerprint": FP_OTHER},
            ["'oncology-mlp'", FP_OTHER[:23], FP_OK[:23], "fingerprints", "fedvault task show"],
        ),
        ({"epsilon": 3.5}, ["ε = 3.5", "max_epsilon_per_job = 3.0"]),
        ({"delta": 1e-4}, ["δ = 0.0001", "max_delta = 1e-05"]),
        (
            {"epsilon": 2.0, "spent_elsewhere": 8.5},
            ["(8.5)", "(2.0)", "10.5", "max_epsilon_total = 10.0", "1.5 remains"],
        ),
        ({"records": 49}, ["49 training records", "min_records = 50"]),
        ({"epsilon": float("nan")}, ["ε = nan", "not a positive number"]),
        ({"epsilon": 0.0}, ["ε = 0.0"]),
        ({"delta": 1.0}, ["δ = 1.0"]),
        ({"spent_elsewhere": -1.0}, ["spent elsewhere = -1.0"]),
    ],
    ids=[
        "task",
        "version",
        "fingerprint",
        "epsilon-per-job",
        "delta",
        "epsilon-total",
        "records",
        "epsilon-nan",
        "epsilon-zero",
        "delta-one",
        "spent-negative",
    ],
)
def test_each_rule_refuses_with_a_self_contained_reason(
    tmp_path: Path, change: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(PolicyRefusalError) as info:
        _policy(tmp_path).check(**{**JOB, **change})
    message = str(info.value)
    assert str(tmp_path / "policy.toml") in message
    for part in expected:
        assert part in message, (part, message)


def test_first_failing_rule_is_the_reason(tmp_path: Path) -> None:
    """A job breaking every rule is refused for its version, the first to fail."""
    bad = {"version": "9", "fingerprint": "x", "epsilon": 99.0, "delta": 0.5, "records": 1}
    with pytest.raises(PolicyRefusalError, match="version '9'") as info:
        _policy(tmp_path).check(**{**JOB, **bad})
    assert "ε" not in str(info.value)


def test_epsilon_total_tolerates_float_rounding(tmp_path: Path) -> None:
    """0.1 + 0.2 is 0.30000000000000004 in floats: not a reason to refuse at a 0.3 limit."""
    policy = SitePolicy.load(
        write_policy(tmp_path / POLICY_FILE, tasks=["t"], max_epsilon_total=0.3)
    )
    assert 0.1 + 0.2 > 0.3
    job = {**JOB, "task": "t", "spent_elsewhere": 0.1}
    policy.check(**{**job, "epsilon": 0.2})
    with pytest.raises(PolicyRefusalError, match=r"max_epsilon_total = 0\.3"):
        policy.check(**{**job, "epsilon": 0.2000001})


def test_empty_task_list_allows_nothing(tmp_path: Path) -> None:
    policy = SitePolicy.load(_write(tmp_path, "[limits]\nmax_epsilon_per_job = 1.0\n"))
    assert policy.tasks == ()
    with pytest.raises(PolicyRefusalError, match=r"\(allowed: none\)"):
        policy.check(**JOB)


def test_missing_file_refuses_and_says_how_to_write_one(tmp_path: Path) -> None:
    path = tmp_path / "state" / POLICY_FILE
    with pytest.raises(PolicyRefusalError) as info:
        SitePolicy.load(path)
    message = str(info.value)
    assert message.startswith(f"no site policy at {path}: this hospital allows no task")
    for part in ("[[tasks]]", 'name = "TASK"', "max_epsilon_per_job", "--policy", "STATE_DIR"):
        assert part in message, part
    assert "\n" not in message


def test_unreadable_path_is_invalid_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError, match="cannot be read"):
        SitePolicy.load(tmp_path)  # a directory


MALFORMED = [
    ("bad-toml", "[limits\nmax_delta = 1e-5\n", ["not valid TOML", "line 1"]),
    ("unknown-top", "[limit]\nmax_delta = 1e-5\n", ["unknown keys ['limit']"]),
    ("unknown-limit", "[limits]\nmax_epsilon = 3.0\n", ["'max_epsilon'", "max_epsilon_per_job"]),
    ("unknown-task-key", '[[tasks]]\nname = "t"\nversion = "1"\n', ["'version'", "versions"]),
    ("eps-string", '[limits]\nmax_epsilon_per_job = "3"\n', ["max_epsilon_per_job", "'3'"]),
    ("eps-zero", "[limits]\nmax_epsilon_per_job = 0.0\n", ["max_epsilon_per_job", "positive"]),
    ("eps-negative", "[limits]\nmax_epsilon_total = -1.0\n", ["max_epsilon_total", "-1.0"]),
    ("eps-inf", "[limits]\nmax_epsilon_total = inf\n", ["max_epsilon_total", "inf"]),
    ("eps-bool", "[limits]\nmax_epsilon_per_job = true\n", ["max_epsilon_per_job", "True"]),
    ("delta-one", "[limits]\nmax_delta = 1.0\n", ["max_delta", "1.0", "(0, 1)"]),
    ("delta-zero", "[limits]\nmax_delta = 0\n", ["max_delta", "(0, 1)"]),
    ("records-zero", "[limits]\nmin_records = 0\n", ["min_records", "positive integer"]),
    ("records-float", "[limits]\nmin_records = 50.0\n", ["min_records", "50.0"]),
    ("limits-not-table", "limits = 3\n", ["limits", "table"]),
    ("tasks-not-tables", 'tasks = ["t"]\n', ["tasks", "[[tasks]]"]),
    ("missing-name", '[[tasks]]\nversions = ["1"]\n', ["entry 1", "name", "missing"]),
    ("empty-name", '[[tasks]]\nname = ""\n', ["entry 1", "name", "''"]),
    ("name-not-string", "[[tasks]]\nname = 3\n", ["name", "got 3"]),
    ("versions-string", '[[tasks]]\nname = "t"\nversions = "1"\n', ["'t'", "versions", "list"]),
    ("versions-empty", '[[tasks]]\nname = "t"\nversions = []\n', ["versions", "omit the key"]),
    ("fingerprints-int", '[[tasks]]\nname = "t"\nfingerprints = [1]\n', ["fingerprints", "[1]"]),
    ("duplicate", '[[tasks]]\nname = "t"\n[[tasks]]\nname = "t"\n', ["name ['t']", "once"]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_file_is_invalid_config_naming_the_key(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(InvalidConfigError) as info:
        SitePolicy.load(path)
    message = str(info.value)
    assert f"site policy {path}" in message
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize(
    "tasks",
    [
        [],
        ["oncology-mlp"],
        ["a", AllowedTask("b", versions=("1.0", "2.0"), fingerprints=(FP_OK,))],
        ['we"ird\\name\t☃'],
    ],
    ids=["none", "one-name", "mixed", "escaped"],
)
def test_write_policy_round_trips(tmp_path: Path, tasks: list[str | AllowedTask]) -> None:
    path = tmp_path / "deep" / "dir" / POLICY_FILE
    out = write_policy(
        path,
        tasks=tasks,
        max_epsilon_per_job=3,
        max_epsilon_total=10.0,
        max_delta=1e-5,
        min_records=50,
    )
    assert out == path
    assert path.read_text(encoding="utf-8").startswith("# fedvault site policy")
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == [POLICY_FILE]  # no temp file left
    policy = SitePolicy.load(path)
    expected = tuple(AllowedTask(t) if isinstance(t, str) else t for t in tasks)
    assert policy == SitePolicy(
        source=path,
        tasks=expected,
        max_epsilon_per_job=3.0,
        max_epsilon_total=10.0,
        max_delta=1e-5,
        min_records=50,
    )


def test_write_policy_defaults_load_with_no_limits(tmp_path: Path) -> None:
    policy = SitePolicy.load(write_policy(tmp_path / POLICY_FILE, tasks=["t"]))
    assert policy == SitePolicy(source=tmp_path / POLICY_FILE, tasks=(AllowedTask("t"),))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"tasks": ["t", "t"]}, "listed more than once"),
        ({"tasks": [""]}, "name"),
        ({"tasks": ["t"], "max_delta": 2.0}, "max_delta"),
        ({"tasks": ["t"], "max_epsilon_per_job": float("nan")}, "max_epsilon_per_job"),
        ({"tasks": ["t"], "min_records": 0}, "min_records"),
    ],
)
def test_write_policy_refuses_bad_values_without_touching_the_file(
    tmp_path: Path, kwargs: dict[str, Any], key: str
) -> None:
    path = write_policy(tmp_path / POLICY_FILE, tasks=["keep"])
    before = path.read_text(encoding="utf-8")
    with pytest.raises(InvalidConfigError, match=key):
        write_policy(path, **kwargs)
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == [POLICY_FILE]


def test_policy_is_immutable(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    with pytest.raises(AttributeError):
        policy.max_epsilon_per_job = 100.0  # type: ignore[misc]
