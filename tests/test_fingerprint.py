"""Task fingerprints: same files give the same fingerprint, any change is named."""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from fedvault.errors import InvalidConfigError, MalformedUpdateError, TaskMismatchError
from fedvault.fingerprint import TaskFingerprint, code_identity, fingerprint_task
from fedvault.task import Task, TrainingDefaults

TASK_SOURCE = """\
# revision a
import torch

from fedvault.task import Task, TrainingDefaults

TASK = Task(
    name="mytask",
    kind="binary",
    build_model=lambda: torch.nn.Linear({inputs}, 2),
    num_outputs=2,
    defaults=TrainingDefaults(batch_size=8, learning_rate=0.1),
)
"""
LINEAR_3_2 = (("weight", (2, 3), "float32"), ("bias", (2,), "float32"))


def make_site(
    root: Path, *, version: str = "0.1.0", inputs: int = 3, dist: bool = True, name: str = "mytask"
) -> Path:
    """A directory to put on ``sys.path``: a task package and, with ``dist``, its dist-info."""
    pkg = root / name
    (pkg / "assets").mkdir(parents=True)
    (pkg / "__init__.py").write_text(TASK_SOURCE.format(inputs=inputs))
    (pkg / "assets" / "vocab.txt").write_text("benign\nmalignant\n")
    if dist:
        info = root / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "top_level.txt").write_text(f"{name}\n")
    return root


def _forget(tops: tuple[str, ...]) -> None:
    for name in [m for m in sys.modules if m.partition(".")[0] in tops]:
        del sys.modules[name]


@contextmanager
def on_path(site: Path, *tops: str) -> Iterator[None]:
    """``site`` first on ``sys.path``, with fresh imports of ``tops`` in and after it."""
    _forget(tops)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(site))  # also invalidates importlib's caches
        try:
            yield
        finally:
            _forget(tops)
    importlib.invalidate_caches()


def fingerprint_in(site: Path, module: str = "mytask") -> TaskFingerprint:
    with on_path(site, module.partition(".")[0]):
        return fingerprint_task(importlib.import_module(module).TASK, module)


def identity_in(site: Path, module: str = "mytask") -> tuple[str, str, str]:
    with on_path(site, module.partition(".")[0]):
        return code_identity(module)


def mismatch(theirs: TaskFingerprint, ours: TaskFingerprint, **labels: str) -> str:
    with pytest.raises(TaskMismatchError) as info:
        theirs.check_matches(ours, **labels)
    return str(info.value)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return make_site(tmp_path / "a")


def test_same_files_same_fingerprint_wherever_installed(site: Path, tmp_path: Path) -> None:
    first, again = fingerprint_in(site), fingerprint_in(site)
    copy = fingerprint_in(make_site(tmp_path / "elsewhere" / "deeper"))
    assert first == again == copy
    assert first.digest == copy.digest and first.digest.startswith("sha256:")
    assert (first.task, first.distribution, first.version) == ("mytask", "mytask", "0.1.0")
    assert first.architecture == LINEAR_3_2
    assert re.fullmatch(r"[0-9a-f]{64}", first.code_sha256)
    first.check_matches(copy)
    expected = (
        f"mytask 0.1.0 (dist mytask, code {first.code_sha256[:12]}, "
        f"arch {first.architecture_sha256[:12]}: 2 tensors, 8 parameters)"
    )
    assert first.describe() == expected


@pytest.mark.parametrize("path", ["__init__.py", "assets/vocab.txt"])
def test_one_changed_byte_changes_the_code_hash(site: Path, tmp_path: Path, path: str) -> None:
    ours = fingerprint_in(site)
    other = make_site(tmp_path / "b")
    target = other / "mytask" / path
    data = bytearray(target.read_bytes())
    data[data.index(b"\n") - 1] ^= 0x01  # the first line's last byte: a comment or data
    target.write_bytes(bytes(data))
    theirs = fingerprint_in(other)
    assert theirs.code_sha256 != ours.code_sha256
    assert theirs.architecture == ours.architecture and theirs.version == ours.version
    message = mismatch(theirs, ours)
    assert message.startswith("task fingerprint differs from the coordinator's: code sha256: ")
    assert theirs.code_sha256 in message and ours.code_sha256 in message
    assert "version:" not in message and "architecture:" not in message
    assert "Install the same version of mytask at every party." in message


def test_new_file_counts_but_bytecode_does_not(site: Path) -> None:
    before = identity_in(site)
    cache = site / "mytask" / "__pycache__"
    cache.mkdir()
    (cache / "__init__.cpython-311.pyc").write_bytes(b"\x00bytecode")
    (site / "mytask" / "stale.pyc").write_bytes(b"\x00bytecode")
    assert identity_in(site) == before
    (site / "mytask" / "assets" / "extra.csv").write_text("a,b\n")
    assert identity_in(site)[2] != before[2]


def test_version_difference_names_both_versions(site: Path, tmp_path: Path) -> None:
    ours = fingerprint_in(site)
    theirs = fingerprint_in(make_site(tmp_path / "b", version="0.2.0"))
    assert theirs.code_sha256 == ours.code_sha256  # the dist-info lies beside the package
    message = mismatch(theirs, ours)
    assert "version: the coordinator runs 0.2.0, this hospital 0.1.0" in message
    assert "code sha256" not in message and theirs.digest != ours.digest


def test_architecture_difference_names_first_tensor(site: Path, tmp_path: Path) -> None:
    ours = fingerprint_in(site)
    theirs = fingerprint_in(make_site(tmp_path / "b", inputs=4))
    message = mismatch(theirs, ours, theirs_label="hospital-b", ours_label="hospital-a")
    assert message.startswith("task fingerprint differs from hospital-b's: code sha256: ")
    assert (
        "architecture: first difference 'weight' (2, 4) float32 vs (2, 3) float32 "
        "(hospital-b vs hospital-a)"
    ) in message


def test_every_differing_part_is_listed() -> None:
    ours = TaskFingerprint("mytask", "mytask", "0.1.0", "a" * 64, LINEAR_3_2)
    theirs = TaskFingerprint(
        "other", "", "", "b" * 64, (("0.weight", (2, 3), "float64"), *LINEAR_3_2)
    )
    message = mismatch(theirs, ours)
    for part in (
        "task: the coordinator runs other, this hospital mytask",
        "distribution: the coordinator runs (none), this hospital mytask",
        "version: the coordinator runs (none), this hospital 0.1.0",
        f"code sha256: the coordinator {'b' * 64} vs this hospital {'a' * 64}",
        "first difference at tensor 0: '0.weight' (2, 3) float64 vs 'weight' (2, 3) float32 "
        "(3 vs 2 tensors)",
        "the task's distribution",
    ):
        assert part in message
    shorter = dataclasses.replace(ours, architecture=LINEAR_3_2[:1])
    assert "first difference at tensor 1: 'bias' (2,) float32 vs (none)" in mismatch(ours, shorter)


def test_json_round_trip(site: Path) -> None:
    fp = fingerprint_in(site)
    text = fp.to_json()
    assert " " not in text and list(json.loads(text)) == sorted(json.loads(text))
    back = TaskFingerprint.from_json(text)
    assert back == fp and back.digest == fp.digest and back.to_json() == text
    assert TaskFingerprint.from_json(text.encode()) == fp


def _json(**changes: object) -> str:
    obj: dict[str, object] = {
        "task": "mytask",
        "distribution": "mytask",
        "version": "0.1.0",
        "code_sha256": "0" * 64,
        "architecture": [["weight", [2, 3], "float32"], ["bias", [2], "float32"]],
        "frozen_sha256": "",
    }
    obj.update(changes)
    return json.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[" * 100_000, "not valid JSON"),
        ("[]", "JSON object"),
        (_json(version=...), "'version' is missing"),
        (_json(extra=1), "'extra' is unknown"),
        (_json(task=7), "'task' must be a string"),
        (_json(task=" "), "'task' is empty"),
        (_json(distribution=None), "'distribution' must be a string"),
        (_json(code_sha256="ABC"), "'code_sha256'"),
        (_json(code_sha256="A" * 64), "'code_sha256'"),
        (_json(architecture={}), "'architecture' must be a list"),
        (_json(architecture=[["w", [2]]]), r"'architecture'\[0\]"),
        (_json(architecture=[["", [2], "float32"]]), r"'architecture'\[0\] name"),
        (_json(architecture=[["w", [-1], "float32"]]), r"\('w'\) shape"),
        (_json(architecture=[["w", [True], "float32"]]), r"\('w'\) shape"),
        (_json(architecture=[["w", [1.0], "float32"]]), r"\('w'\) shape"),
        (_json(architecture=[["w", 2, "float32"]]), r"\('w'\) shape"),
        (_json(architecture=[["w", [2], 32]]), r"\('w'\) dtype"),
        (_json(architecture=[["w", [2], "f"], ["w", [2], "f"]]), "twice"),
    ],
)
def test_hostile_json_is_refused(text: str | bytes, names: str) -> None:
    with pytest.raises(MalformedUpdateError, match=names):
        TaskFingerprint.from_json(text)


def test_plain_module_on_pythonpath(tmp_path: Path) -> None:
    site = tmp_path / "plain"
    site.mkdir()
    source = TASK_SOURCE.format(inputs=3) + '\n__version__ = "1.2.3"\n'
    (site / "plaintask.py").write_text(source)
    (site / "unrelated.txt").write_text("not part of the task")
    fp = fingerprint_in(site, "plaintask")
    assert (fp.distribution, fp.version, fp.architecture) == ("", "1.2.3", LINEAR_3_2)
    assert fp.describe().startswith("mytask 1.2.3 (no distribution, code ")
    (site / "unrelated.txt").write_text("changed")
    assert fingerprint_in(site, "plaintask") == fp
    (site / "plaintask.py").write_text(source + "# patched\n")
    assert fingerprint_in(site, "plaintask").code_sha256 != fp.code_sha256


def test_distribution_found_through_record(tmp_path: Path) -> None:
    site = make_site(tmp_path / "a", dist=False)
    info = site / "mytask_dist-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mytask-dist\nVersion: 0.3.0\n")
    (info / "top_level.txt").write_text("something_else\n")  # hides RECORD from the mapping
    (info / "RECORD").write_text("mytask/__init__.py,,\nmytask_dist-0.3.0.dist-info/RECORD,,\n")
    assert identity_in(site)[:2] == ("mytask-dist", "0.3.0")


SPLIT_INIT = """\
import os

# Stands in for an editable install's package-dir mapping.
__path__ += [p for p in os.environ.get("SPLITPKG_EXTRA", "").split(os.pathsep) if p]
"""


def test_package_spread_over_directories_hashes_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = tmp_path / "wheel"
    (wheel / "splitpkg" / "sub").mkdir(parents=True)
    (wheel / "splitpkg" / "__init__.py").write_text(SPLIT_INIT)
    (wheel / "splitpkg" / "sub" / "__init__.py").write_text(TASK_SOURCE.format(inputs=3))
    editable, mapped = tmp_path / "editable", tmp_path / "src"
    (editable / "splitpkg").mkdir(parents=True)
    (mapped / "sub").mkdir(parents=True)
    (editable / "splitpkg" / "__init__.py").write_text(SPLIT_INIT)
    (mapped / "sub" / "__init__.py").write_text(TASK_SOURCE.format(inputs=3))
    as_wheel = fingerprint_in(wheel, "splitpkg.sub")
    monkeypatch.setenv("SPLITPKG_EXTRA", str(mapped))
    as_editable = fingerprint_in(editable, "splitpkg.sub")
    assert as_editable == as_wheel  # same files, however installed
    (mapped / "sub" / "model.py").write_text("HIDDEN = 16\n")
    assert identity_in(editable, "splitpkg.sub")[2] != as_wheel.code_sha256


def test_model_built_under_fixed_seed_without_touching_rng(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    random_width = Task(
        name="random-width",
        kind="binary",
        build_model=lambda: torch.nn.Linear(int(torch.randint(2, 1000, ())), 2),
        num_outputs=2,
        defaults=TrainingDefaults(batch_size=8, learning_rate=0.1),
    )
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    with on_path(site, "mytask"):
        first = fingerprint_task(random_width, "mytask")
        torch.manual_seed(123)
        assert fingerprint_task(random_width, "mytask") == first
        torch.manual_seed(7)
        fingerprint_task(random_width, "mytask")
    assert torch.equal(torch.rand(3), expected[0])
    assert (random.random(), np.random.rand()) == expected[1:]


def test_bad_module_or_model_is_refused(site: Path) -> None:
    with pytest.raises(InvalidConfigError, match="cannot find task module 'no_such_task_xyz'"):
        code_identity("no_such_task_xyz")
    with pytest.raises(InvalidConfigError, match="not a module name"):
        code_identity("my task")
    not_a_model = Task(
        name="not-a-model",
        kind="binary",
        build_model=lambda: "model",  # type: ignore[arg-type,return-value]
        num_outputs=2,
        defaults=TrainingDefaults(batch_size=8, learning_rate=0.1),
    )
    with on_path(site, "mytask"), pytest.raises(InvalidConfigError, match=r"nn\.Module"):
        fingerprint_task(not_a_model, "mytask")


def test_module_imports_without_torch(site: Path) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "from fedvault.fingerprint import code_identity\n"
        "print(code_identity('mytask')[:2])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "('mytask', '0.1.0')"
