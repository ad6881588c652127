"""A round already answered is replayed byte for byte, never retrained."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedvault.client.sent import SentUpdates
from fedvault.config import JobConfig
from fedvault.examples import get_example
from fedvault.messages import ModelPayload, ReplyStatus, RoundInstruction, TrainReply


def _instr(model: ModelPayload, server_round: int = 3) -> RoundInstruction:
    job = JobConfig.for_example(get_example("breast-cancer"), hospitals=3, rounds=5)
    return RoundInstruction(job=job, server_round=server_round, key_epoch=1, model=model)


def test_replay_returns_the_identical_reply_only_for_the_identical_instruction(
    tmp_path: Path,
) -> None:
    sent = SentUpdates(tmp_path)
    model = ModelPayload(envelope=b"global-model-ciphertext")
    reply = TrainReply(
        hospital="hospital-1",
        status=ReplyStatus.OK,
        update=ModelPayload(envelope=b"update"),
        samples=152,
        train_loss=0.3,
        epsilon=1.25,
        delta=1e-5,
        noise_multiplier=1.7,
        sample_rate=0.2,
        steps=15,
        round_steps=5,
        accountant="prv",
        accountant_state="{}",
        eval_accuracy=0.9,
        eval_loss=0.2,
        eval_samples=38,
    )
    assert sent.get(_instr(model)) is None
    sent.put(_instr(model), reply)
    assert sent.get(_instr(model)) == reply
    assert sent.get(_instr(ModelPayload(envelope=b"another global model"))) is None
    assert sent.get(_instr(model, server_round=4)) is None


def test_plaintext_updates_and_refusals(tmp_path: Path) -> None:
    sent = SentUpdates(tmp_path)
    model = ModelPayload(arrays={"w": np.ones((2, 3), np.float32)})
    update = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2, np.float32)}
    reply = TrainReply(
        hospital="h", status=ReplyStatus.OK, update=ModelPayload(arrays=update), samples=10
    )
    sent.put(_instr(model), reply)
    got = sent.get(_instr(model))
    assert got is not None and got.update is not None and got.update.arrays is not None
    for name, value in update.items():
        np.testing.assert_array_equal(got.update.arrays[name], value)
        assert got.update.arrays[name].dtype == value.dtype
    refused = TrainReply(hospital="h", status=ReplyStatus.REFUSED, reason="budget")
    sent.put(_instr(model, 5), refused)  # a refusal is not a release: nothing kept
    assert sent.get(_instr(model, 5)) is None
