"""The job summary in a round instruction: compressed on the wire, checked on arrival."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, Metadata, RecordDict

from fedvault.config import JobConfig
from fedvault.coordinator.server_app import CoordinatorSettings, _RoundRunner
from fedvault.errors import MalformedUpdateError
from fedvault.examples import get_example
from fedvault.messages import (
    CONFIG_KEY,
    MAX_SUMMARY_BYTES,
    MODEL_KEY,
    SUMMARY_ZLIB,
    ModelPayload,
    RoundInstruction,
    pack_summary,
    payload_to_record,
)
from fedvault.task_registry import load_task

JOB = JobConfig.for_example(
    get_example("breast-cancer"), hospitals=3, rounds=2, secure_aggregation="none"
)
MODEL = ModelPayload(arrays={"w": np.arange(4, dtype=np.float32)})


def _summary(hospitals: int, rounds: int) -> str:
    """A summary shaped like report.summarise's: each round's metrics and every ε."""
    return json.dumps(
        {
            "job": "j",
            "rounds": [
                {
                    "round": r,
                    "metrics": {"accuracy": 0.5 + r / 100},
                    "epsilon": {f"hospital-{h}": 0.1 * r for h in range(1, hospitals + 1)},
                }
                for r in range(1, rounds + 1)
            ],
        }
    )


def _delivered(content: RecordDict) -> Message:
    """A TRAIN message as the hospital receives it (with the metadata Flower delivers)."""
    metadata = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=1,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="2",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


def _arrived(config: ConfigRecord) -> RoundInstruction:
    content = RecordDict({MODEL_KEY: payload_to_record(MODEL), CONFIG_KEY: config})
    return RoundInstruction.from_message(_delivered(content))


def _config(**fields: object) -> ConfigRecord:
    base: dict[str, object] = {"job-config": JOB.to_json(), "server-round": 2, "key-epoch": 1}
    return ConfigRecord({**base, **fields})  # type: ignore[arg-type]


def test_the_coordinators_instruction_carries_the_summary_compressed() -> None:
    settings = CoordinatorSettings(
        job=JOB, store_url="sqlite://", task=load_task("breast-cancer"), report_dir=None
    )
    runner = _RoundRunner(None, settings, None, 1)  # type: ignore[arg-type]
    runner.summary = _summary(hospitals=100, rounds=9)
    config = runner._config(2)
    assert config["summary"] == ""  # an older hospital keeps nothing this round, and trains
    packed = config[SUMMARY_ZLIB]
    assert isinstance(packed, bytes) and len(packed) < len(runner.summary) / 5
    assert _arrived(config).summary == runner.summary


def test_an_instruction_round_trips_its_summary_and_an_empty_one() -> None:
    for summary in (_summary(3, 2), "", "ε ≤ 3 — unicode survives"):
        instr = RoundInstruction(job=JOB, server_round=2, key_epoch=1, model=MODEL, summary=summary)
        arrived = RoundInstruction.from_message(_delivered(instr.to_content()))
        assert arrived.summary == summary


def test_an_older_coordinators_text_summary_is_still_read() -> None:
    assert _arrived(_config(summary=_summary(3, 1))).summary == _summary(3, 1)


@pytest.mark.parametrize(
    ("packed", "says"),
    [
        ("text, not bytes", "must be bytes"),
        (b"not zlib at all", "does not decompress"),
        (pack_summary(_summary(3, 2))[:-6], "truncated"),
        (zlib.compress(b"\0" * (MAX_SUMMARY_BYTES + 1)), f"expands past {MAX_SUMMARY_BYTES}"),
        (zlib.compress("é".encode("latin-1")), "not UTF-8"),
    ],
    ids=["not-bytes", "garbage", "truncated", "bomb", "not-utf8"],
)
def test_a_bad_compressed_summary_is_refused_as_malformed(packed: object, says: str) -> None:
    with pytest.raises(MalformedUpdateError, match=says):
        _arrived(_config(summary="", **{SUMMARY_ZLIB: packed}))


def test_a_summary_at_the_cap_is_read() -> None:
    text = "x" * MAX_SUMMARY_BYTES
    assert _arrived(_config(**{SUMMARY_ZLIB: zlib.compress(text.encode())})).summary == text
