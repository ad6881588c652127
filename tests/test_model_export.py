"""Taking a model home: choosing a version, decrypting it at a hospital, the model card,
and the coordinator's refusal to export what it cannot read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import text

from fedvault.app.model_export import (
    ModelVersion,
    build_card,
    export_from_hospital,
    export_from_store,
    list_versions_hospital,
    list_versions_store,
    load_export,
    select_round,
    weights_digest,
    write_export,
)
from fedvault.client.archive import ModelArchive
from fedvault.client.keys import KeyStore
from fedvault.coordinator.records import HospitalEval, ModelBlob, Participation, RoundCommit
from fedvault.coordinator.store import RoundStore
from fedvault.errors import InvalidConfigError, KeyMismatchError, StoreError
from fedvault.messages import ModelPayload
from fedvault.npz import arrays_to_bytes
from fedvault.privacy.he import encrypt_update
from fedvault.privacy.he_context import HeContext

PRIVACY = {"epsilon": 3.0, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv"}
HOSPITALS = ("hospital-1", "hospital-2")
AT_REST_KEY = bytes(range(32))


def _config(job: str, mode: str = "he", best_metric: str = "auroc") -> dict[str, Any]:
    return {
        "job": job,
        "task": "breast-cancer",
        "hospitals": 2,
        "rounds": 3,
        "privacy": PRIVACY,
        "secure_aggregation": mode,
        "best_metric": best_metric,
    }


def _summary(metrics: dict[int, dict[str, float]]) -> dict[str, Any]:
    """A job report as coordinator/report.build_report writes it, plus per-round metrics."""
    rounds = [
        {
            "round": r,
            "accuracy": m.get("accuracy"),
            "loss": m.get("loss"),
            "metrics": m,
            "epsilon": {h: 0.5 * r + 0.01 * i for i, h in enumerate(HOSPITALS, 1)},
            "hospital_metrics": {
                h: {"auroc": m["auroc"] - 0.01 * i} for i, h in enumerate(HOSPITALS)
            },
            "participants": list(HOSPITALS),
        }
        for r, m in sorted(metrics.items())
    ]
    last = max(metrics)
    hospitals = {
        h: {
            "samples": 100 * i,
            "noise_multiplier": 1.1,
            "sample_rate": 0.01 * i,
            "steps": 10 * last,
            "accountant": "prv",
            "epsilon": 0.5 * last + 0.01 * i,
            "delta": 1e-5,
        }
        for i, h in enumerate(HOSPITALS, 1)
    }
    final = {"rounds_completed": len(metrics), "status": "finished"}
    return {"config": {}, "rounds": rounds, "final": final, "hospitals": hospitals}


METRICS = {
    1: {"auroc": 0.80, "loss": 0.50, "accuracy": 0.70},
    2: {"auroc": 0.90, "loss": 0.45, "accuracy": 0.80},
    3: {"auroc": 0.85, "loss": 0.40, "accuracy": 0.82},
}


# -- choosing a version ---------------------------------------------------------------


def test_select_latest_best_and_numbered() -> None:
    summary = _summary(METRICS)
    held = [0, 1, 2, 3]
    assert select_round(held, summary, "latest", metric="auroc") == 3
    assert select_round([0], None, "latest", metric="loss") == 0
    assert select_round(held, summary, "best", metric="auroc") == 2  # higher is better
    assert select_round(held, summary, "best", metric="loss") == 3  # lower is better
    assert select_round([0, 1, 3], summary, "best", metric="auroc") == 3  # among those held
    assert select_round(held, summary, "2", metric="auroc") == 2
    tie = _summary({1: {"auroc": 0.9}, 2: {"auroc": 0.9}})
    assert select_round([1, 2], tie, "best", metric="auroc") == 2  # a tie: the later round


def test_select_refusals_say_what_exists() -> None:
    summary = _summary(METRICS)
    with pytest.raises(InvalidConfigError, match=r"no model version 7; versions held: 0, 1, 2"):
        select_round([0, 1, 2], summary, "7", metric="auroc")
    with pytest.raises(InvalidConfigError, match=r"metrics recorded: accuracy, auroc, loss"):
        select_round([0, 1, 2], summary, "best", metric="rmse")
    with pytest.raises(InvalidConfigError, match="no evaluated round yet"):
        select_round([0, 1], None, "best", metric="loss")
    with pytest.raises(InvalidConfigError, match="'latest', 'best' or a round number"):
        select_round([0, 1], summary, "newest", metric="loss")
    with pytest.raises(InvalidConfigError, match="no model version is held"):
        select_round([], summary, "latest", metric="loss")


def test_best_reads_reports_without_a_metrics_key() -> None:
    summary = _summary(METRICS)
    for r in summary["rounds"]:
        del r["metrics"]  # a report from before per-round metrics: accuracy and loss only
    assert select_round([1, 2, 3], summary, "best", metric="accuracy") == 3
    assert select_round([1, 2, 3], summary, "best", metric="loss") == 3


# -- exporting at a hospital ------------------------------------------------------------


def _linear() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(5, 2)


def _weights(model: torch.nn.Module, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() * np.float32(scale) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def he_ctx() -> HeContext:
    return HeContext.generate()


@pytest.fixture
def hospital_state(tmp_path: Path, he_ctx: HeContext) -> Path:
    """A hospital's state dir: its HE key and the global models of rounds 0-3 of job 'j'."""
    state = tmp_path / "hospital-1"
    KeyStore(state).put(0, he_ctx)
    archive = ModelArchive(state)
    model = _linear()
    for number in range(4):
        envelope = encrypt_update(
            he_ctx.public(),
            _weights(model, scale=1.0 + number),
            weight=1.0,
            key_epoch=0,
            job="j",
            server_round=number,
        )
        archive.put_model(
            "j",
            number,
            ModelPayload(envelope=envelope),
            job_config=json.dumps(_config("j")),
            task_fingerprint=json.dumps({"task": "breast-cancer", "digest": "cd" * 32}),
        )
    archive.put_summary("j", _summary(METRICS))
    return state


def test_hospital_export_decrypts_into_a_loadable_model(
    hospital_state: Path, tmp_path: Path
) -> None:
    out = export_from_hospital(
        state_dir=hospital_state, job="j", selector="best", out=tmp_path / "x"
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md",
        "model-card.json",
        "model.safetensors",
    ]
    model = torch.nn.Linear(5, 2)
    model.load_state_dict(load_file(str(out / "model.safetensors")))  # strict: every key
    expected = _weights(_linear(), scale=3.0)  # best auroc: round 2, encrypted at scale 3
    for name, tensor in model.state_dict().items():
        np.testing.assert_allclose(tensor.numpy(), expected[name], rtol=0, atol=2**-16)
    weights, card = load_export(out)
    assert card["round"] == 2 and card["selection"]["metric"] == "auroc"
    assert card["exported_by"] == "hospital" and card["task"]["fingerprint"]["digest"] == "cd" * 32
    assert weights_digest(weights) == card["weights_sha256"]
    latest = export_from_hospital(
        state_dir=hospital_state, job="j", selector="latest", out=tmp_path / "y"
    )
    assert load_export(latest)[1]["round"] == 3
    initial = export_from_hospital(
        state_dir=hospital_state, job="j", selector="0", out=tmp_path / "z"
    )
    assert load_export(initial)[1]["privacy"]["hospitals"]["hospital-1"]["at_round"] == {
        "epsilon": 0.0,
        "delta": 0.0,
    }


def test_the_card_carries_privacy_and_metrics(hospital_state: Path, tmp_path: Path) -> None:
    out = export_from_hospital(state_dir=hospital_state, job="j", selector="1", out=tmp_path / "x")
    card = json.loads((out / "model-card.json").read_text())
    assert card["job"] == "j" and card["task"]["name"] == "breast-cancer"
    assert card["secure_aggregation"] == "he" and card["privacy"]["target"] == PRIVACY
    assert card["metrics"]["consortium"] == METRICS[1]
    assert card["metrics"]["hospitals"] == {
        "hospital-1": {"auroc": 0.8},
        "hospital-2": {"auroc": 0.79},
    }
    assert card["metrics_per_round"] == [{"round": r, "metrics": m} for r, m in METRICS.items()]
    assert card["privacy"]["hospitals"]["hospital-2"] == {
        "at_round": {"epsilon": 0.52, "delta": 1e-5},
        "at_job_end": {"epsilon": 1.52, "delta": 1e-5},
        "noise_multiplier": 1.1,
        "sample_rate": 0.02,
        "steps": 30,
        "accountant": "prv",
        "samples": 200,
    }
    assert card["exported_at"].endswith("+00:00") and card["fedvault_version"]
    assert len(card["files"]["model.safetensors"]["sha256"]) == 64
    text = (out / "MODEL_CARD.md").read_text()
    assert "# Model card: j, round 1" in text
    assert "| hospital-2 | 0.52 | 1e-05 | 1.52 | 1e-05 | 1.1 | 0.02 | 30 | prv |" in text
    assert "| 1 (exported) | 0.7 | 0.8 | 0.5 |" in text  # accuracy, auroc, loss
    assert "| 3 | 0.82 | 0.85 | 0.4 |" in text
    assert "ε = 3, δ = 1e-05" in text and card["weights_sha256"] in text


def test_hospital_export_refusals(hospital_state: Path, tmp_path: Path, he_ctx: HeContext) -> None:
    with pytest.raises(InvalidConfigError, match=r"no model version 9; versions held: 0, 1, 2, 3"):
        export_from_hospital(state_dir=hospital_state, job="j", selector="9", out=tmp_path / "x")
    with pytest.raises(InvalidConfigError, match=r"no models of job 'k' \(jobs held: j\)"):
        export_from_hospital(
            state_dir=hospital_state, job="k", selector="latest", out=tmp_path / "x"
        )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(InvalidConfigError, match="not empty"):
        export_from_hospital(state_dir=hospital_state, job="j", selector="latest", out=busy)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    # Another state dir with the archive but not the key (or with another consortium's key).
    for key in (None, HeContext.generate()):
        other = tmp_path / f"other-{key is None}"
        shutil.copytree(hospital_state / "models", other / "models")
        if key is not None:
            KeyStore(other).put(0, key)
        with pytest.raises(KeyMismatchError, match="--state of a hospital that holds"):
            export_from_hospital(state_dir=other, job="j", selector="latest", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing was half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _card(**changes: Any) -> dict[str, Any]:
    """``build_card`` of round 1 of a coordinator's export, with ``changes``."""
    fields: dict[str, Any] = {
        "task_fingerprint": None,
        "server_round": 1,
        "selector": "latest",
        "summary": None,
        "consortium": "c",
        "exported_by": "coordinator",
        "weights_sha256": "0" * 64,
    }
    return dict(build_card(**(fields | changes)))


def test_a_large_consortiums_card_gives_the_largest_epsilon() -> None:
    # Above 100 hospitals the coordinator relays only the largest ε (report.summarise).
    from fedvault.app.model_card import card_markdown
    from fedvault.coordinator.report import Report, summarise

    summary = summarise(Report.from_json(_summary(METRICS)), lists_up_to=1).to_json()
    card = _card(job_config=_config("j"), server_round=2, selector="2", summary=summary)
    assert card["privacy"]["hospitals"] == {}
    assert card["privacy"]["hospitals_not_listed"] == 2
    assert card["privacy"]["epsilon_max"] == {"at_round": 1.02, "at_job_end": None}
    text = card_markdown(card)
    assert "2 hospitals are not listed" in text
    assert "the largest ε was 1.02 at round 2" in text


def test_an_export_is_checked_against_its_card(tmp_path: Path) -> None:
    weights = {"w": np.ones((2, 2), dtype=np.float32)}
    card = _card(job_config=_config("p", "none"))
    with pytest.raises(InvalidConfigError, match="weights_sha256"):
        write_export(tmp_path / "x", weights=weights, card=card)
    out = write_export(
        tmp_path / "x", weights=weights, card={**card, "weights_sha256": weights_digest(weights)}
    )
    (out / "model.safetensors").write_bytes(
        (out / "model.safetensors").read_bytes()[:-4] + b"\0" * 4
    )
    with pytest.raises(InvalidConfigError, match="modified or damaged"):
        load_export(out)
    with pytest.raises(InvalidConfigError, match="not a fedvault model export"):
        load_export(tmp_path)


def test_list_versions_hospital(hospital_state: Path) -> None:
    versions = list_versions_hospital(hospital_state)
    assert list(versions) == ["j"]
    assert versions["j"][0] == ModelVersion(0, {})
    assert versions["j"][2] == ModelVersion(2, METRICS[2])
    assert list_versions_hospital(hospital_state, "j") == versions
    with pytest.raises(InvalidConfigError, match="jobs held: j"):
        list_versions_hospital(hospital_state, "k")


# -- exporting at the coordinator -----------------------------------------------------------


def _run(store: RoundStore, job: str, mode: str, models: list[dict[str, np.ndarray]]) -> None:
    """A job of len(models) - 1 committed, evaluated rounds; loss is lowest at round 1."""
    record = store.open_job(job, _config(job, mode, best_metric="loss"))

    def blob(number: int) -> ModelBlob:
        data = arrays_to_bytes(models[number]) if mode == "none" else b"ciphertext"
        return ModelBlob(number, "plain" if mode == "none" else "bfv", data, 300.0)

    store.save_initial_model(record.id, blob(0))
    for number in range(1, len(models)):
        parts = tuple(
            Participation(
                hospital=h,
                status="ok",
                samples=100 * i,
                epsilon=0.5 * number + 0.01 * i,
                delta=1e-5,
                noise_multiplier=1.1,
                sample_rate=0.01 * i,
                steps=10 * number,
                accountant="prv",
            )
            for i, h in enumerate(HOSPITALS, 1)
        )
        commit = RoundCommit(
            number=number, model=blob(number), participations=parts, train_loss=1.0
        )
        store.commit_round(record.id, commit)
        loss = 0.3 if number == 1 else 0.5
        evals = [HospitalEval(hospital=h, accuracy=0.8, loss=loss, samples=10) for h in HOSPITALS]
        store.record_evaluation(record.id, number, evaluations=evals)


@pytest.mark.parametrize("key", [None, AT_REST_KEY], ids=["plain", "at-rest"])
def test_store_model_reads_any_round(tmp_path: Path, key: bytes | None) -> None:
    url = "sqlite:///" + str(tmp_path / "s.sqlite")
    models = [_weights(_linear(), scale=s) for s in (1.0, 2.0, 3.0)]
    with RoundStore(url, at_rest_key=key) as store:
        _run(store, "p", "none", models)
        job = store.get_job("p")
        assert job is not None
        assert store.model_rounds(job.id) == [0, 1, 2]
        for number in (0, 1, 2):
            got = store.model(job.id, number)
            assert got == ModelBlob(number, "plain", arrays_to_bytes(models[number]), 300.0)
        assert store.model(job.id, 7) is None
        assert store.model(job.id, 2) == store.latest_model(job.id)
        with pytest.raises(StoreError, match="no job with id 99"):
            store.model_rounds(99)
        with store.engine.begin() as conn:  # corrupt round 1's stored model
            blob = conn.execute(text("SELECT blob FROM models WHERE round = 1")).scalar_one()
            bad = bytes([blob[0] ^ 1]) + blob[1:]
            conn.execute(text("UPDATE models SET blob = :b WHERE round = 1"), {"b": bad})
        with pytest.raises(StoreError, match=r"round.1.*(tampered|corrupted)"):
            store.model(job.id, 1)
    if key is not None:
        out = tmp_path / "x"
        with pytest.raises(StoreError):  # sealed at rest: the coordinator kit's key is needed
            export_from_store(store_url=url, job="p", selector="2", out=out)
        export_from_store(store_url=url, job="p", selector="2", out=out, at_rest_key=key)
        assert load_export(out)[1]["round"] == 2


def test_coordinator_exports_plaintext_jobs_only(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "s.sqlite")
    models = [_weights(_linear(), scale=s) for s in (1.0, 2.0, 3.0)]
    with RoundStore(url) as store:
        _run(store, "p", "none", models)
        _run(store, "h", "he", models)
    with pytest.raises(InvalidConfigError, match="job h ran in he mode") as excinfo:
        export_from_store(store_url=url, job="h", selector="latest", out=tmp_path / "x")
    assert "fedvault model export --kit HOSPITAL_KIT --state HOSPITAL_STATE --job h" in str(
        excinfo.value
    )
    with pytest.raises(InvalidConfigError, match=r"no job 'q' .*jobs held: h, p"):
        export_from_store(store_url=url, job="q", selector="latest", out=tmp_path / "x")

    out = export_from_store(store_url=url, job="p", selector="best", out=tmp_path / "x")
    weights, card = load_export(out)
    assert card["round"] == 1 and card["exported_by"] == "coordinator"  # lowest loss
    assert card["secure_aggregation"] == "none"
    for name, value in models[1].items():
        np.testing.assert_array_equal(weights[name], value)
    assert card["privacy"]["hospitals"]["hospital-1"]["at_round"]["epsilon"] == 0.51
    assert card["privacy"]["hospitals"]["hospital-1"]["at_job_end"]["epsilon"] == 1.01
    assert card["metrics_per_round"][1] == {"round": 2, "metrics": {"accuracy": 0.8, "loss": 0.5}}

    versions = list_versions_store(url)
    assert sorted(versions) == ["h", "p"]
    assert [v.round for v in versions["h"]] == [0, 1, 2]  # listed, though not exportable here
    assert versions["p"][1] == ModelVersion(1, {"accuracy": 0.8, "loss": 0.3})
    assert list(list_versions_store(url, "p")) == ["p"]
