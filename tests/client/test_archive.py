"""The hospital's archive of received global models: round trip, idempotence, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedvault.client.archive import ModelArchive, write_durably
from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.messages import ModelPayload

CONFIG = json.dumps({"job": "j", "task": "digits", "secure_aggregation": "he"})
FINGERPRINT = json.dumps({"task": "digits", "digest": "ab" * 32})


def _put(archive: ModelArchive, job: str, number: int, payload: ModelPayload) -> None:
    archive.put_model(job, number, payload, job_config=CONFIG, task_fingerprint=FINGERPRINT)


def test_round_trip_ciphertext_and_plaintext(tmp_path: Path) -> None:
    archive = ModelArchive(tmp_path)
    assert archive.jobs() == []
    for number in (0, 2, 1):
        _put(archive, "j", number, ModelPayload(envelope=f"ciphertext-{number}".encode()))
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}
    _put(archive, "plain-job", 1, ModelPayload(arrays=arrays))

    assert archive.jobs() == ["j", "plain-job"]
    assert archive.versions("j") == [0, 1, 2]
    assert archive.model("j", 2) == ModelPayload(envelope=b"ciphertext-2")
    assert sorted(p.name for p in (tmp_path / "models" / "j").iterdir()) == [
        "job.json",
        "round-000000.he",
        "round-000001.he",
        "round-000002.he",
    ]
    got = archive.model("plain-job", 1)
    assert got.envelope is None and got.arrays is not None
    assert set(got.arrays) == {"w", "b"}
    np.testing.assert_array_equal(got.arrays["w"], arrays["w"])
    assert got.arrays["w"].dtype == np.float32
    assert archive.job_info("j") == (CONFIG, FINGERPRINT)

    assert archive.summary("j") is None
    summary = {"rounds": [{"round": 1, "metrics": {"auroc": 0.8}}], "consortium": "c"}
    archive.put_summary("j", summary)
    assert archive.summary("j") == summary
    archive.put_summary("j", {**summary, "consortium": "c2"})  # the latest report replaces
    assert archive.summary("j") == {**summary, "consortium": "c2"}


def test_same_round_twice_keeps_the_first_copy(tmp_path: Path) -> None:
    archive = ModelArchive(tmp_path)
    _put(archive, "j", 3, ModelPayload(envelope=b"first"))
    _put(archive, "j", 3, ModelPayload(envelope=b"second"))
    _put(archive, "j", 3, ModelPayload(arrays={"w": np.zeros(2)}))  # another kind: still kept
    assert archive.model("j", 3) == ModelPayload(envelope=b"first")
    assert archive.versions("j") == [3]
    leftovers = [p.name for p in (tmp_path / "models" / "j").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file survives


def test_write_durably_never_clobbers_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "f"
    assert write_durably(path, b"one", overwrite=False)
    assert not write_durably(path, b"two", overwrite=False)
    assert path.read_bytes() == b"one"
    assert write_durably(path, b"three")
    assert path.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


@pytest.mark.parametrize(
    "job", ["../evil", "..", ".hidden", "a/b", "a\\b", "", "x\n", "-x", "a" * 65, "é", None]
)
def test_job_names_that_could_escape_are_refused(tmp_path: Path, job: object) -> None:
    archive = ModelArchive(tmp_path / "state")
    with pytest.raises(InvalidConfigError, match="is not a job name"):
        archive.put_model(
            job,  # type: ignore[arg-type]
            1,
            ModelPayload(envelope=b"x"),
            job_config=CONFIG,
            task_fingerprint=FINGERPRINT,
        )
    with pytest.raises(InvalidConfigError, match="is not a job name"):
        archive.put_summary(job, {})  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="is not a job name"):
        archive.model(job, 1)  # type: ignore[arg-type]
    assert not (tmp_path / "evil").exists()
    assert archive.jobs() == []


def test_missing_version_and_job_name_what_is_held(tmp_path: Path) -> None:
    archive = ModelArchive(tmp_path)
    for number in (0, 1, 4):
        _put(archive, "j", number, ModelPayload(envelope=b"x"))
    with pytest.raises(InvalidConfigError, match=r"no model version 2 .*versions held: 0, 1, 4"):
        archive.model("j", 2)
    with pytest.raises(InvalidConfigError, match=r"no models of job 'k' \(jobs held: j\)"):
        archive.versions("k")
    with pytest.raises(InvalidConfigError, match="integer >= 0"):
        archive.model("j", -1)


def test_refusals(tmp_path: Path) -> None:
    archive = ModelArchive(tmp_path)
    with pytest.raises(MalformedUpdateError, match="empty"):
        _put(archive, "j", 1, ModelPayload())
    with pytest.raises(InvalidConfigError, match="not valid JSON"):
        archive.put_model("j", 1, ModelPayload(envelope=b"x"), job_config="{", task_fingerprint="")
    with pytest.raises(InvalidConfigError, match="not plain JSON"):
        archive.put_summary("j", {"loss": float("nan")})
    _put(archive, "j", 1, ModelPayload(envelope=b"x"))
    other = json.dumps({"job": "j", "task": "breast-cancer"})
    with pytest.raises(InvalidConfigError, match="under another configuration"):
        archive.put_model(
            "j", 2, ModelPayload(envelope=b"y"), job_config=other, task_fingerprint=""
        )
    assert archive.versions("j") == [1]
    # The same configuration, serialised in another key order, is the same job.
    reordered = json.dumps(dict(reversed(list(json.loads(CONFIG).items()))))
    archive.put_model(
        "j", 2, ModelPayload(envelope=b"y"), job_config=reordered, task_fingerprint=""
    )
    assert archive.versions("j") == [1, 2]
    assert archive.job_info("j") == (CONFIG, FINGERPRINT)  # job.json keeps its first text
