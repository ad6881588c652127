"""Masked rounds end to end in one process: the coordinator's round runner, hospitals'
masking and unmasking code (fedvault.client.masking, the ClientApp's query handler).

A masked round must decrypt to exactly the sum an unmasked round of the same
survivors gives, with 0, 1 (the most five hospitals tolerate: k = 4, T = 3) dropouts
after masking; one more dropout fails the attempt cleanly (no model, the reason
audited), the attempt is recorded as failed and the round retried.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from fedvault.client import client_app
from fedvault.client.keys import KeyStore
from fedvault.client.masking import (
    masked_update,
    provision_seal_keys,
    purge_committed,
    remask,
    simulated_seal_keys,
)
from fedvault.client.site import HospitalIdentity
from fedvault.config import JobConfig, TrainingConfig
from fedvault.coordinator import server_app
from fedvault.coordinator.server_app import CoordinatorSettings, _RoundRunner
from fedvault.coordinator.store import RoundStore
from fedvault.messages import (
    ModelPayload,
    ReplyStatus,
    RoundInstruction,
    TrainReply,
    payload_to_record,
)
from fedvault.privacy.dp import PrivacyConfig
from fedvault.privacy.he import decrypt_average, encrypt_update
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.secagg import SecAggParams
from fedvault.privacy.secagg_messages import MaskedShares
from fedvault.task_registry import load_task

NAMES = [f"hospital-{i}" for i in range(1, 6)]
NODES = {100 + i: name for i, name in enumerate(NAMES)}
SAMPLES = {name: 30 + 7 * i for i, name in enumerate(NAMES)}
JOB = JobConfig(
    job="masked",
    task="breast-cancer",
    hospitals=len(NAMES),
    min_hospitals=3,
    rounds=1,
    privacy=PrivacyConfig(epsilon=3.0, delta=1e-5),
    training=TrainingConfig(batch_size=8, learning_rate=0.1),
    round_timeout_s=1.0,
)


def _update(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(NAMES.index(name))
    return {"w": rng.standard_normal((30, 40)).astype(np.float32), "b": rng.standard_normal(5)}


def test_five_hospitals_tolerate_one_dropout_by_default() -> None:
    params = SecAggParams()
    k = params.degree_for(len(NAMES))
    assert (k, params.threshold_for(k)) == (4, 3)  # survives k - T = 1 dropout


@dataclass
class Consortium:
    """Five hospitals behind a fake Grid; ``silent`` ones mask but never reply."""

    root: Path
    ctx: HeContext = field(default_factory=HeContext.generate)
    silent: set[str] = field(default_factory=set)
    unmasked: set[str] = field(default_factory=set)  # reply without their shares
    pending: dict[str, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pub = self.ctx.public()
        provision_seal_keys(self.root, NAMES)
        for name in NAMES:
            KeyStore(self.root / name).put(0, self.ctx)
        self.initial = encrypt_update(self.pub, _update(NAMES[0]), weight=1.0, job=JOB.job)

    # --- the Grid the round runner talks to ------------------------------------

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids do
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for msg_id in message_ids:
            msg = self.pending.pop(msg_id, None)
            if msg is not None and (reply := self._answer(msg)) is not None:
                out.append(reply)
        return out

    # --- the hospitals ---------------------------------------------------------

    def _answer(self, msg: Message) -> Message | None:
        name = NODES[msg.metadata.dst_node_id]
        state = self.root / name
        if msg.metadata.message_type != "train":
            return client_app._query(HospitalIdentity(name, KeyStore(state), None), msg)
        instr = RoundInstruction.from_message(msg)
        envelope, shares = masked_update(
            KeyStore(state),
            simulated_seal_keys(state),
            name,
            instr,
            _update(name),
            SAMPLES[name],
            state_dir=state,
        )  # masked and kept: a silent hospital drops *after* masking
        if name in self.silent:
            return None
        reply = _reply(
            name, ModelPayload(envelope=envelope), "" if name in self.unmasked else shares
        )
        return Message(reply.to_content(), reply_to=msg)

    def runner(self, store: RoundStore | None = None, job_id: int = 1) -> _RoundRunner:
        settings = CoordinatorSettings(
            job=JOB, store_url="sqlite://", task=load_task(JOB.task), public_context=self.pub
        )
        return _RoundRunner(self, settings, store, job_id)  # type: ignore[arg-type]

    def unmasked_sum(self, survivors: Iterable[str]) -> dict[str, np.ndarray]:
        """What the same survivors' round decrypts to without masking."""
        from fedvault.coordinator.strategy import SecureFedAvg

        strategy = SecureFedAvg(job=JOB, public_context=self.pub, key_epoch=0)
        collector = strategy.round_collector(1)
        for i, name in enumerate(survivors):
            env = encrypt_update(
                self.ctx,
                _update(name),
                weight=float(SAMPLES[name]),
                job=JOB.job,
                server_round=1,
            )
            reply = _reply(name, ModelPayload(envelope=env), "")
            msg = Message(reply.to_content(), dst_node_id=1, message_type="train")
            msg.metadata.__dict__["_src_node_id"] = 200 + i
            collector.add(msg)
        outcome = collector.finish()
        assert outcome.model is not None and outcome.model.envelope is not None
        return decrypt_average(self.ctx, outcome.model.envelope)


def _reply(name: str, update: ModelPayload, shares: str) -> TrainReply:
    return TrainReply(
        hospital=name,
        status=ReplyStatus.OK,
        update=update,
        samples=SAMPLES[name],
        train_loss=0.3,
        epsilon=0.5,
        delta=1e-5,
        noise_multiplier=1.0,
        sample_rate=0.5,
        steps=2,
        round_steps=2,
        accountant="prv",
        accountant_state='{"history": [[1.0, 0.5, 2]]}',
        masked_shares=shares,
    )


@pytest.fixture(autouse=True)
def _server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast polls, and what Flower sets in a ServerApp process (to build messages)."""
    monkeypatch.setattr(server_app, "_POLL_S", 0.0)
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.mark.parametrize("dropped", [(), ("hospital-3",)], ids=["no-dropout", "max-1-dropout"])
def test_a_masked_round_decrypts_exactly_to_the_unmasked_sum(
    tmp_path: Path, dropped: tuple[str, ...]
) -> None:
    consortium = Consortium(tmp_path, silent=set(dropped))
    runner = consortium.runner()
    outcome = runner.train(1, ModelPayload(envelope=consortium.initial))
    assert outcome.failure == ""
    assert outcome.model is not None and outcome.model.envelope is not None
    survivors = [n for n in NAMES if n not in dropped]
    assert outcome.accepted == len(survivors)
    got = decrypt_average(consortium.ctx, outcome.model.envelope)
    want = consortium.unmasked_sum(survivors)
    assert got.keys() == want.keys()
    for key in want:  # the decrypted aggregate, bit for bit
        assert got[key].tobytes() == want[key].tobytes()


def test_one_dropout_too_many_fails_the_attempt_cleanly_and_it_is_retried(
    tmp_path: Path,
) -> None:
    consortium = Consortium(tmp_path / "hospitals", silent={"hospital-2", "hospital-4"})
    with RoundStore(f"sqlite:///{tmp_path / 'store.db'}") as store:
        job = store.open_job(JOB.job, JOB.to_dict())
        runner = consortium.runner(store, job.id)
        failures: list[str] = []

        class Observer:
            def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
                failures.append(reason)
                consortium.silent.clear()  # the dropped hospitals are back for the retry

        model = ModelPayload(envelope=consortium.initial)
        outcome = server_app._train_round(
            runner,
            store,
            job.id,
            JOB,
            1,
            model,
            Observer(),  # type: ignore[arg-type]
        )
        assert len(failures) == 1 and "cannot be unmasked" in failures[0]
        assert outcome is not None and outcome.model is not None  # the retry succeeded
        assert outcome.model.envelope is not None
        rounds = store.rounds(job.id)
        assert [r.status for r in rounds] == ["failed"]
        events = [e.kind for e in store.audit_events()]
        assert "round_unmask_failed" in events
    got = decrypt_average(consortium.ctx, outcome.model.envelope)
    want = consortium.unmasked_sum(NAMES)
    for key in want:
        assert got[key].tobytes() == want[key].tobytes()


def test_a_hospital_unmasks_only_one_attempt_of_a_round(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path)
    runner = consortium.runner()
    model = ModelPayload(envelope=consortium.initial)
    assert runner.train(1, model).model is not None
    # A second attempt of the same round: the hospitals mask again, refuse to unmask.
    again = runner.train(1, model)
    assert again.model is None and "cannot be unmasked" in again.failure
    refused = [e for e in again.audit if e.kind == "unmask_rejected"]
    assert len(refused) == len(NAMES)
    assert all("already unmasked" in str(e.detail["reason"]) for e in refused)
    assert payload_to_record(model)  # the model sent is untouched


def test_a_committed_rounds_kept_update_and_sessions_are_purged(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path)
    runner = consortium.runner()
    model = ModelPayload(envelope=consortium.initial)
    assert runner.train(1, model).model is not None
    state = tmp_path / "hospital-1"
    kept = state / "secagg" / JOB.job / "round-1"
    assert "update.npz" in {p.name for p in kept.iterdir()}
    assert purge_committed(state, JOB.job, through_round=0) == []  # round 1 not committed
    assert purge_committed(state, JOB.job, through_round=1) == [1]
    assert sorted(p.name for p in kept.iterdir()) == ["answered"]
    assert purge_committed(state, JOB.job) == []  # nothing left to purge
    # A late query for the purged round reveals nothing: it is refused with a reason.
    again = runner.train(1, model)
    refused = [e for e in again.audit if e.kind == "unmask_rejected"]
    assert any(e.actor == "hospital-1" for e in refused), refused


def test_an_update_without_its_shares_is_rejected_and_the_rest_unmasked(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path, unmasked={"hospital-2"})
    outcome = consortium.runner().train(1, ModelPayload(envelope=consortium.initial))
    statuses = {p.hospital: p.status for p in outcome.participations}
    assert statuses["hospital-2"] == "rejected"
    reasons = [p.reason for p in outcome.participations if p.hospital == "hospital-2"]
    assert "unmasked update to a masked round" in reasons[0]
    assert outcome.model is not None and outcome.model.envelope is not None
    survivors = [n for n in NAMES if n != "hospital-2"]
    got = decrypt_average(consortium.ctx, outcome.model.envelope)
    want = consortium.unmasked_sum(survivors)
    for key in want:
        assert got[key].tobytes() == want[key].tobytes()


def test_a_retry_re_masks_the_kept_update_under_its_new_context(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path)
    state = tmp_path / "hospital-1"
    seal = simulated_seal_keys(state)
    model = ModelPayload(envelope=consortium.initial)
    first = RoundInstruction(
        job=JOB, server_round=1, key_epoch=0, model=model, participants=tuple(NAMES), attempt=1
    )
    envelope, shares = masked_update(
        KeyStore(state), seal, "hospital-1", first, _update("hospital-1"), 30, state_dir=state
    )
    assert remask(KeyStore(state), seal, "hospital-1", first, shares, 30, state_dir=state) is None
    retry = RoundInstruction(
        job=JOB, server_round=1, key_epoch=0, model=model, participants=tuple(NAMES), attempt=2
    )
    again = remask(KeyStore(state), seal, "hospital-1", retry, shares, 30, state_dir=state)
    assert again is not None and again[0] != envelope
    assert MaskedShares.from_bytes(again[1].encode()).context == retry.round_context().digest
    assert first.round_context().digest != retry.round_context().digest


def test_masking_is_on_by_default_and_old_job_files_resume_unchanged() -> None:
    assert JOB.masking and JOB.masked
    stored = JOB.to_dict()
    assert "masking" not in stored  # jobs stored before masking compare equal
    assert JobConfig.from_dict(stored).masking
    off = JobConfig.from_dict({**stored, "masking": False})
    assert not off.masked and off.to_dict()["masking"] is False
    plain = JobConfig.from_dict({**stored, "secure_aggregation": "none"})
    assert plain.masking and not plain.masked  # `none` mode never masks


def test_an_unmask_query_must_name_a_valid_job() -> None:
    from fedvault.errors import MalformedUpdateError
    from fedvault.messages import UnmaskQuery
    from fedvault.privacy.secagg_messages import UnmaskRequest

    request = UnmaskRequest(
        context=b"\0" * 32, recipient="hospital-1", survivors=(), dropped=(), shares={}
    )
    msg = Message(
        UnmaskQuery("masked", 1, request).to_content(), dst_node_id=1, message_type="query"
    )
    assert UnmaskQuery.from_message(msg).request == request
    bad = Message(UnmaskQuery("../x", 1, request).to_content(), dst_node_id=1, message_type="query")
    with pytest.raises(MalformedUpdateError, match="no valid job"):
        UnmaskQuery.from_message(bad)
