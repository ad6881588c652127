"""Hostile and broken replies: each is rejected with a logged reason and changes nothing.

A corpus of hostile kinds, each made from a real, valid hospital reply (a real
HE encryption of a real update) by one mutation: of the envelope's protobuf
fields, of its bytes, of the Flower records around it, or of the message
itself. Every kind goes through :meth:`SecureFedAvg.collect_train`, the
coordinator's validation path, and must

(a) be rejected with a reason that names the problem (a key word) and what to
    do, logged on ``fedvault.coordinator`` and recorded as one
    ``update_rejected`` audit event;
(b) leave the aggregate byte-identical to that of the valid replies alone,
    whether it arrives after them or before them (a first reply must not be
    able to set the layout for the others);
(c) leave the round store unchanged. One job per backend (SQLite file,
    PostgreSQL) commits, as the ServerApp does, one round per kind: the valid
    replies plus that kind. Its dump of every table (blobs as bytes) must
    equal the dump of the same job without hostile replies, except for one
    ``rejected`` participation row and one ``update_rejected`` audit row per
    kind (rows after them have shifted ids, and audit rows after them other
    chain hashes; those columns are compared without, and the chain is
    verified). And the validation path alone leaves a SQLite file's bytes
    untouched.

The store's clock is frozen in (c) so that timestamps, and with them the audit
hashes, are comparable. A few plaintext-job kinds run through (a) and (b).

Not detectable, so not in the corpus: bit flips inside a ciphertext's
coefficients (ciphertexts carry no MAC; TLS protects them in transit, and a
hostile hospital could encrypt garbage anyway) and swapped chunks of the same
key (every BFV chunk is a full ciphertext).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from sqlalchemy import Engine, inspect, select, text

from fedvault.config import DEFAULT_MAX_UPDATE_BYTES, JobConfig, SecureAggregation, TrainingConfig
from fedvault.coordinator import store as store_module
from fedvault.coordinator import store_models
from fedvault.coordinator.records import AuditEvent, RoundCommit
from fedvault.coordinator.server_app import _to_blob
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.coordinator.store_models import Base
from fedvault.coordinator.strategy import RoundOutcome, SecureFedAvg
from fedvault.errors import InvalidConfigError
from fedvault.messages import (
    ENVELOPE_KEY,
    METRICS_KEY,
    MODEL_KEY,
    STATUS_KEY,
    ModelPayload,
    ReplyStatus,
    TrainReply,
    payload_to_record,
)
from fedvault.privacy.dp import PrivacyConfig
from fedvault.privacy.he import FORMAT_VERSION, encrypt_update, parse_envelope
from fedvault.privacy.he_context import HeContext
from fedvault.proto import update_pb2

if TYPE_CHECKING:  # conftest is not importable under --import-mode=importlib
    from conftest import StoreTarget

CAP = 512 * 1024  # the job's max_update_bytes: a valid reply here is ~70 KB
KEY_EPOCH = 3
ROUND = 2  # the round under attack; round 1 is committed before it
HOSPITALS = {"hospital-1": (101, 120), "hospital-2": (102, 300), "hospital-3": (103, 45)}
ENROLLED = {node: hospital for hospital, (node, _) in HOSPITALS.items()}  # from enrolment
VALID = ("hospital-1", "hospital-2")  # round 2's valid replies; hospital-3 turns hostile
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
JOB = JobConfig(
    job="hostile-corpus",
    task="breast-cancer",
    hospitals=3,
    rounds=100,
    privacy=PrivacyConfig(epsilon=3.0, delta=1e-5),
    training=TrainingConfig(batch_size=8, learning_rate=0.1),
    min_hospitals=2,
    max_update_bytes=CAP,
)
# A reason must say what to do, not only what is wrong.
ACTION = re.compile(
    r"discard|resend|must|re-run|install|raise|check|regenerate|run the same|only the first"
    r"|configured for another",
    re.IGNORECASE,
)


def _model(seed: int) -> dict[str, np.ndarray]:
    """5100 values: two ciphertext chunks at 4096 slots."""
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((40, 120)).astype(np.float32),
        "b": rng.standard_normal(300),
    }


class World:
    """Real keys, real encrypted replies for any round, and the valid rounds' outcomes.

    Round 1 has all three hospitals; every later round the valid replies of
    hospital-1 and hospital-2 only, so that hospital-3's reply can turn hostile.
    """

    def __init__(self) -> None:
        self.ctx = HeContext.generate()
        self.pub = self.ctx.public()
        self.other = HeContext.generate()  # another consortium's key
        # The round-0 model, encrypted once (encryption is randomised).
        self.initial = encrypt_update(
            self.pub, _model(0), weight=1.0, key_epoch=KEY_EPOCH, job=JOB.job
        )
        self._replies: dict[tuple[str, int], Message] = {}
        self._outcomes: dict[int, RoundOutcome] = {}

    def envelope(self, hospital: str, server_round: int, **kwargs: Any) -> bytes:
        """A fresh, valid encryption of ``hospital``'s update (kwargs override)."""
        node, samples = HOSPITALS[hospital]
        args: dict[str, Any] = {
            "weight": float(samples),
            "key_epoch": KEY_EPOCH,
            "job": JOB.job,
            "server_round": server_round,
        }
        ctx = kwargs.pop("ctx", self.ctx)
        args.update(kwargs)
        return encrypt_update(ctx, _model(node * 1000 + server_round), **args)

    def valid(self, hospital: str, server_round: int) -> Message:
        """``hospital``'s valid reply in ``server_round`` (one encryption per round)."""
        key = (hospital, server_round)
        if key not in self._replies:
            # Replies evaluate the model they received; past round 2 they do not, which
            # spares the store test an evaluation per round.
            evaluated = 10 if server_round <= ROUND else 0
            envelope = self.envelope(hospital, server_round)
            self._replies[key] = reply(hospital, envelope=envelope, eval_samples=evaluated)
        return self._replies[key]

    def model_before(self, server_round: int) -> ModelPayload:
        if server_round == 1:
            return ModelPayload(envelope=self.initial)
        model = self.outcome(server_round - 1).model
        assert model is not None
        return model

    def strategy(self, server_round: int) -> SecureFedAvg:
        """The coordinator's strategy, told the model it sent (as configure_train does)."""
        s = SecureFedAvg(job=JOB, public_context=self.pub, key_epoch=KEY_EPOCH, enrolled=ENROLLED)
        s.expect_model(server_round, payload_to_record(self.model_before(server_round)))
        return s

    def replies(self, server_round: int) -> list[Message]:
        hospitals = HOSPITALS if server_round == 1 else VALID
        return [self.valid(h, server_round) for h in hospitals]

    def outcome(self, server_round: int) -> RoundOutcome:
        """The round from its valid replies alone."""
        if server_round not in self._outcomes:
            replies = self.replies(server_round)
            outcome = self.strategy(server_round).collect_train(server_round, replies)
            assert outcome.accepted == len(replies) and not outcome.audit
            self._outcomes[server_round] = outcome
        return self._outcomes[server_round]


def reply(
    hospital: str,
    /,
    *,
    envelope: bytes | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    content: RecordDict | None = None,
    node: int | None = None,
    message_type: str = MessageType.TRAIN,
    **fields: Any,
) -> Message:
    """A Flower reply of ``hospital`` to a train instruction, as its ClientApp sends it."""
    default_node, samples = HOSPITALS[hospital]
    if content is None:
        values: dict[str, Any] = {
            "hospital": hospital,
            "status": ReplyStatus.OK,
            "update": ModelPayload(envelope=envelope, arrays=arrays),
            "samples": samples,
            "train_loss": 0.5 + default_node / 1000,
            "epsilon": 0.6,
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "sample_rate": 8 / samples,
            "steps": 20,
            "round_steps": 10,
            "accountant": "prv",
            "accountant_state": json.dumps({"history": [[1.1, 8 / samples, 20]]}),
            "eval_accuracy": 0.8,
            "eval_loss": 0.4,
            "eval_samples": 10,
        }
        values.update(fields)
        content = TrainReply(**values).to_content()
    node_id = default_node if node is None else node
    # The metadata the SuperLink delivers a reply with (a reply to the round's instruction).
    metadata = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=node_id,
        dst_node_id=1,
        reply_to_message_id=f"train-{node_id}",
        group_id="",
        created_at=NOW.timestamp(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


# --- the corpus -------------------------------------------------------------------------

Build = Callable[[World, int], Message]  # (world, round) -> hostile reply


def _envelope_of(msg: Message) -> bytes:
    return bytes(msg.content.array_records[MODEL_KEY][ENVELOPE_KEY].numpy().tobytes())


def edit_envelope(edit: Callable[[update_pb2.UpdateEnvelope], object]) -> Build:
    """hospital-3's valid envelope with one protobuf edit."""

    def build(w: World, r: int) -> Message:
        env = parse_envelope(_envelope_of(w.valid("hospital-3", r)))
        edit(env)
        return reply("hospital-3", envelope=env.SerializeToString())

    return build


def edit_bytes(edit: Callable[[bytes], bytes]) -> Build:
    """hospital-3's valid envelope, its serialized bytes edited."""
    return lambda w, r: reply("hospital-3", envelope=edit(_envelope_of(w.valid("hospital-3", r))))


def edit_records(edit: Callable[[dict[str, Any], World], None]) -> Build:
    """hospital-3's valid reply with its Flower records edited."""

    def build(w: World, r: int) -> Message:
        records = dict(w.valid("hospital-3", r).content.items())
        records = {
            k: type(v)(dict(v.items())) if not isinstance(v, ArrayRecord) else v
            for k, v in records.items()
        }
        edit(records, w)
        return reply("hospital-3", content=RecordDict(records))

    return build


def set_metric(name: str, value: object) -> Build:
    return edit_records(lambda r, w: r[METRICS_KEY].__setitem__(name, value))


def set_status(name: str, value: object) -> Build:
    return edit_records(lambda r, w: r[STATUS_KEY].__setitem__(name, value))


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _set_chunk(env: update_pb2.UpdateEnvelope, i: int, value: bytes) -> None:
    env.chunks[i] = value


def _layout(env: update_pb2.UpdateEnvelope) -> Any:
    return env.layout.tensors


def _extend(env: update_pb2.UpdateEnvelope, items: list[bytes]) -> None:
    env.chunks.extend(items)


@dataclass(frozen=True)
class Kind:
    name: str
    build: Build
    keyword: str  # must appear in the reason (case-insensitive)
    # A second reply from a hospital or node that already replied must come second
    # (the first reply counts); in a name that already has a participation row it is
    # audited but gets no row of its own (the store keeps one row per hospital).
    second: bool = False
    row: bool = True


def _other_key(w: World, r: int) -> Message:
    return reply("hospital-3", envelope=w.envelope("hospital-3", r, ctx=w.other))


def _stale_epoch(w: World, r: int) -> Message:
    return reply("hospital-3", envelope=w.envelope("hospital-3", r, key_epoch=KEY_EPOCH - 1))


def _other_job(w: World, r: int) -> Message:
    return reply("hospital-3", envelope=w.envelope("hospital-3", r, job="another-job"))


def _replayed(w: World, r: int) -> Message:
    """hospital-3's own reply of the previous round, byte for byte, sent again."""
    return reply("hospital-3", content=w.valid("hospital-3", r - 1).content)


def _duplicate(w: World, r: int) -> Message:
    """A second, different update in hospital-1's name, from hospital-1's node."""
    env = _envelope_of(w.valid("hospital-3", r))
    return reply("hospital-1", envelope=env, samples=HOSPITALS["hospital-3"][1])


def _in_another_name(w: World, r: int) -> Message:
    """hospital-3's node replies as hospital-1: first, it would shut hospital-1 out."""
    env = _envelope_of(w.valid("hospital-3", r))
    return reply("hospital-1", envelope=env, samples=HOSPITALS["hospital-3"][1], node=103)


def _unenrolled_node(w: World, r: int) -> Message:
    """hospital-3's reply from a node no hospital enrolled."""
    return reply("hospital-3", envelope=_envelope_of(w.valid("hospital-3", r)), node=999)


def _oversized(w: World, r: int) -> Message:
    env = parse_envelope(_envelope_of(w.valid("hospital-3", r)))
    env.chunks.append(b"\0" * CAP)
    return reply("hospital-3", envelope=env.SerializeToString())


def _random_bytes(w: World, r: int) -> Message:
    size = len(_envelope_of(w.valid("hospital-3", r)))
    return reply("hospital-3", envelope=np.random.default_rng(7).bytes(size))


def _garbled_chunk(env: update_pb2.UpdateEnvelope) -> None:
    env.chunks[1] = np.random.default_rng(11).bytes(len(env.chunks[1]))


def _plaintext(w: World, r: int) -> Message:
    content = w.valid("hospital-3", r).content
    records = dict(content.items())
    records[MODEL_KEY] = ArrayRecord({k: Array(v) for k, v in _model(1).items()})
    return reply("hospital-3", content=RecordDict(records))


def _model_record(record: ArrayRecord) -> Build:
    def edit(r: dict[str, Any], w: World) -> None:
        r[MODEL_KEY] = record

    return edit_records(edit)


def _envelope_plus_plaintext(w: World, r: int) -> Message:
    env = np.frombuffer(_envelope_of(w.valid("hospital-3", r)), dtype=np.uint8)
    record = ArrayRecord({ENVELOPE_KEY: Array(env), "w": Array(np.zeros(3))})
    return _model_record(record)(w, r)


def _envelope_as_floats(w: World, r: int) -> Message:
    env = np.frombuffer(_envelope_of(w.valid("hospital-3", r)), dtype=np.uint8)
    return _model_record(ArrayRecord({ENVELOPE_KEY: Array(env.astype(np.float32))}))(w, r)


def _message_type(message_type: str) -> Build:
    return lambda w, r: reply(
        "hospital-3", content=w.valid("hospital-3", r).content, message_type=message_type
    )


def _drop_record(key: str) -> Build:
    return edit_records(lambda r, w: r.pop(key))


def _swap_names(env: update_pb2.UpdateEnvelope) -> None:
    t = _layout(env)
    t[0].name, t[1].name = t[1].name, t[0].name


def _set_tensor(i: int, **fields: Any) -> Callable[[update_pb2.UpdateEnvelope], None]:
    def edit(env: update_pb2.UpdateEnvelope) -> None:
        tensor = _layout(env)[i]
        for key, value in fields.items():
            if key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)

    return edit


def _unknown_record(r: dict[str, Any], w: World) -> None:
    r["backdoor"] = ConfigRecord({"run": "rm -rf /"})


def _huge_accountant_state(r: dict[str, Any], w: World) -> None:
    r[STATUS_KEY]["accountant-state"] = json.dumps({"pad": "x" * CAP})


KINDS = [
    # --- key and envelope header
    Kind("other-consortium-key", _other_key, "key ceremony"),
    Kind(
        "forged-fingerprint",
        edit_envelope(lambda e: setattr(e, "context_fingerprint", "0" * 64)),
        "key ceremony",
    ),
    Kind("stale-key-epoch", _stale_epoch, "key epoch"),
    Kind("wrong-job", _other_job, "job"),
    Kind("replayed-earlier-round-update", _replayed, "stale"),
    Kind(
        "unknown-format-version",
        edit_envelope(lambda e: setattr(e, "format_version", FORMAT_VERSION + 1)),
        "format_version",
    ),
    Kind("unknown-scheme", edit_envelope(lambda e: setattr(e, "scheme", "paillier")), "scheme"),
    # --- envelope bytes
    Kind("truncated-envelope", edit_bytes(lambda b: b[: len(b) // 2]), "truncated"),
    Kind("random-bytes-envelope", _random_bytes, "corrupt"),
    Kind("empty-envelope", edit_bytes(lambda b: b""), "empty"),
    # --- ciphertext chunks
    Kind(
        "truncated-chunk",
        edit_envelope(lambda e: _set_chunk(e, 0, e.chunks[0][: len(e.chunks[0]) // 2])),
        "chunk",
    ),
    Kind(
        "bit-flipped-chunk-header",
        edit_envelope(lambda e: _set_chunk(e, 0, _flip(e.chunks[0], 0))),
        "chunk",
    ),
    Kind("garbled-chunk", edit_envelope(_garbled_chunk), "chunk"),
    Kind("extra-chunk", edit_envelope(lambda e: _extend(e, [e.chunks[0]])), "chunk"),
    Kind("missing-chunk", edit_envelope(lambda e: e.chunks.pop()), "chunk"),
    Kind("no-chunks", edit_envelope(lambda e: e.ClearField("chunks")), "chunk"),
    # --- layout
    Kind("layout-renamed-tensor", edit_envelope(_set_tensor(0, name="w_renamed")), "layout"),
    Kind("layout-swapped-names", edit_envelope(_swap_names), "layout"),
    Kind("layout-transposed-shape", edit_envelope(_set_tensor(0, shape=[120, 40])), "layout"),
    Kind("layout-wrong-dtype", edit_envelope(_set_tensor(0, dtype="float64")), "layout"),
    Kind("layout-integer-dtype", edit_envelope(_set_tensor(0, dtype="int32")), "layout"),
    Kind("layout-negative-dim", edit_envelope(_set_tensor(0, shape=[-40, -120])), "layout"),
    Kind("layout-duplicate-name", edit_envelope(_set_tensor(1, name="w")), "layout"),
    Kind(
        "layout-extra-tensor",
        edit_envelope(lambda e: _layout(e).add(name="z", shape=[0], dtype="float32")),
        "layout",
    ),
    Kind(
        "fixed-point-scale-differs",
        edit_envelope(lambda e: setattr(e, "scale_bits", e.scale_bits + 4)),
        "fixed-point",
    ),
    Kind(
        "fixed-point-bound-differs",
        edit_envelope(lambda e: setattr(e, "value_bound_bits", 0)),
        "fixed-point",
    ),
    # --- sample weight
    Kind(
        "negative-envelope-weight",
        edit_envelope(lambda e: setattr(e, "sample_weight", -45.0)),
        "sample_weight",
    ),
    Kind(
        "zero-envelope-weight",
        edit_envelope(lambda e: setattr(e, "sample_weight", 0.0)),
        "sample_weight",
    ),
    Kind(
        "absurd-envelope-weight-1e300",
        edit_envelope(lambda e: setattr(e, "sample_weight", 1e300)),
        "sample_weight",
    ),
    Kind(
        "infinite-envelope-weight",
        edit_envelope(lambda e: setattr(e, "sample_weight", math.inf)),
        "sample_weight",
    ),
    Kind(
        "nan-envelope-weight",
        edit_envelope(lambda e: setattr(e, "sample_weight", math.nan)),
        "sample_weight",
    ),
    Kind("zero-num-examples", set_metric("num-examples", 0), "num-examples"),
    Kind("negative-num-examples", set_metric("num-examples", -45), "num-examples"),
    Kind("absurd-num-examples", set_metric("num-examples", 10**15), "num-examples"),
    Kind("fractional-num-examples", set_metric("num-examples", 45.5), "num-examples"),
    # --- metrics
    Kind("nan-train-loss", set_metric("train-loss", math.nan), "train-loss"),
    Kind("inf-eval-accuracy", set_metric("eval-accuracy", math.inf), "eval-accuracy"),
    Kind("eval-accuracy-above-1", set_metric("eval-accuracy", 1.5), "eval-accuracy"),
    Kind("nan-epsilon", set_metric("epsilon", math.nan), "epsilon"),
    Kind("negative-epsilon", set_metric("epsilon", -1.0), "epsilon"),
    Kind("delta-of-one", set_metric("delta", 1.0), "delta"),
    Kind("sample-rate-above-1", set_metric("sample-rate", 1.5), "sample-rate"),
    Kind("metric-as-list", set_metric("train-loss", [0.1, 0.2]), "train-loss"),
    # --- protocol
    Kind("duplicate-reply", _duplicate, "duplicate", second=True, row=False),
    Kind("reply-in-another-hospitals-name", _in_another_name, "enrolled"),
    Kind("reply-from-an-unenrolled-node", _unenrolled_node, "enrolled"),
    Kind("oversized-update", _oversized, "max_update_bytes"),
    Kind("oversized-config", edit_records(_huge_accountant_state), "max_update_bytes"),
    Kind("query-message-type", _message_type(MessageType.QUERY), "message type"),
    Kind("evaluate-message-type", _message_type(MessageType.EVALUATE), "message type"),
    Kind("unknown-record", edit_records(_unknown_record), "unexpected records"),
    Kind("missing-metrics-record", _drop_record(METRICS_KEY), "lacks"),
    Kind("missing-model-record", _drop_record(MODEL_KEY), "model"),
    # --- malformed config record
    Kind("config-hospital-not-text", set_status("hospital", 42), "hospital"),
    Kind("config-hospital-empty", set_status("hospital", ""), "hospital"),
    Kind(
        "config-hospital-injection", set_status("hospital", "h3'; DROP TABLE jobs;--"), "hospital"
    ),
    Kind("config-unknown-status", set_status("status", "maybe"), "status"),
    Kind("config-status-as-bytes", set_status("status", b"ok"), "status"),
    Kind(
        "config-accountant-state-not-json",
        set_status("accountant-state", "{not json"),
        "accountant-state",
    ),
    # --- payload kind
    Kind("plaintext-update-in-he-job", _plaintext, "plaintext"),
    Kind("envelope-plus-plaintext-arrays", _envelope_plus_plaintext, "plaintext"),
    Kind("envelope-as-float-array", _envelope_as_floats, "byte string"),
]
IDS = [k.name for k in KINDS]


def _rejection(outcome: RoundOutcome, kind: Kind, server_round: int = ROUND) -> str:
    """The one rejection in ``outcome`` (its audit event and participation): its reason."""
    (event,) = outcome.audit
    assert (event.kind, event.detail["round"]) == ("update_rejected", server_round), kind.name
    reason = str(event.detail["reason"])
    assert kind.keyword.lower() in reason.lower(), reason
    assert ACTION.search(reason), f"the reason does not say what to do: {reason}"
    rejected = [(p.hospital, p.reason) for p in outcome.participations if p.status == "rejected"]
    assert rejected == ([(event.actor, reason)] if kind.row else [])
    return reason


def _same_aggregate(outcome: RoundOutcome, baseline: RoundOutcome) -> None:
    assert outcome.model is not None and baseline.model is not None
    assert outcome.model.envelope == baseline.model.envelope  # byte for byte
    assert outcome.total_weight == baseline.total_weight
    assert outcome.train_loss == baseline.train_loss
    assert outcome.evaluations == baseline.evaluations
    ok = [p for p in outcome.participations if p.status == "ok"]
    assert ok == baseline.participations


def test_max_update_bytes_is_a_validated_job_setting() -> None:
    fields = {k: v for k, v in JOB.to_dict().items() if k != "max_update_bytes"}
    assert JobConfig.from_dict(fields).max_update_bytes == DEFAULT_MAX_UPDATE_BYTES == 2**28
    assert JobConfig.from_json(JOB.to_json()).max_update_bytes == CAP
    for bad in (0, 1023, -1, 1.5e6, True, "256M"):
        with pytest.raises(InvalidConfigError, match="max_update_bytes"):
            dataclasses.replace(JOB, max_update_bytes=bad)


def test_corpus_is_large_and_every_kind_differs_from_the_valid_reply(world: World) -> None:
    assert len(KINDS) >= 22 and len(set(IDS)) == len(IDS)
    valid = world.valid("hospital-3", ROUND)
    for kind in KINDS:
        hostile = kind.build(world, ROUND)
        same = (
            hostile.metadata.message_type == valid.metadata.message_type
            and hostile.metadata.src_node_id == valid.metadata.src_node_id
            and hostile.content == valid.content
        )
        assert not same, kind.name


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_hostile_reply_is_rejected_logged_and_changes_no_aggregate(
    world: World, kind: Kind, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = kind.build(world, ROUND)
    valid = world.replies(ROUND)
    orders = [[*valid, hostile]] + ([] if kind.second else [[hostile, *valid]])
    for replies in orders:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fedvault.coordinator"):
            outcome = world.strategy(ROUND).collect_train(ROUND, replies)
        reason = _rejection(outcome, kind)
        assert any(
            r.name == "fedvault.coordinator" and reason in r.getMessage() for r in caplog.records
        )
        _same_aggregate(outcome, world.outcome(ROUND))
    # Alone it makes no model at all.
    alone = world.strategy(ROUND).collect_train(ROUND, [hostile])
    if kind.second:  # alone it is the first reply: fine
        assert alone.accepted == 1
    else:
        assert (alone.model, alone.accepted) == (None, 0)
        _rejection(alone, kind)


# --- plaintext jobs (secure_aggregation = "none") ---------------------------------------

PLAIN_JOB = dataclasses.replace(JOB, secure_aggregation=SecureAggregation.NONE)


def _plain_update(hospital: str, **edits: np.ndarray) -> dict[str, np.ndarray]:
    arrays = _model(HOSPITALS[hospital][0])
    arrays.update(edits)
    return arrays


PLAIN_KINDS = {
    "nan-in-a-tensor": ({"b": np.full(300, math.nan)}, "NaN"),
    "inf-in-a-tensor": ({"w": np.full((40, 120), math.inf, dtype=np.float32)}, "NaN or Inf"),
    "transposed-tensor": ({"w": np.zeros((120, 40), dtype=np.float32)}, "layout"),
    "integer-tensor": ({"b": np.zeros(300, dtype=np.int64)}, "layout"),
    "extra-tensor": ({"z": np.zeros(3)}, "layout"),
}


@pytest.mark.parametrize("edits, keyword", PLAIN_KINDS.values(), ids=PLAIN_KINDS.keys())
def test_plaintext_job_rejects_hostile_updates(
    world: World, edits: dict[str, np.ndarray], keyword: str
) -> None:
    sent = ArrayRecord({k: Array(v) for k, v in _model(0).items()})
    valid = [reply(h, arrays=_plain_update(h)) for h in VALID]
    hostile = reply("hospital-3", arrays=_plain_update("hospital-3", **edits))
    # An encrypted update in a plaintext job, from a fourth hospital.
    envelope = _envelope_of(world.valid("hospital-3", ROUND))
    encrypted = reply("hospital-3", envelope=envelope, node=104, hospital="hospital-4")
    outcomes = []
    for replies in ([*valid, hostile, encrypted], [hostile, encrypted, *valid], valid):
        s = SecureFedAvg(job=PLAIN_JOB, public_context=None)
        s.expect_model(ROUND, sent)
        outcomes.append(s.collect_train(ROUND, replies))
    *mixed, alone = outcomes
    for outcome in mixed:
        reasons = [str(e.detail["reason"]) for e in outcome.audit]
        assert len(reasons) == 2 and keyword in reasons[0], reasons
        assert "encrypted update in a plaintext job" in reasons[1]
        assert outcome.model is not None and alone.model is not None
        assert outcome.model.arrays is not None and alone.model.arrays is not None
        for name, value in alone.model.arrays.items():
            assert outcome.model.arrays[name].tobytes() == value.tobytes()
        assert outcome.total_weight == alone.total_weight


# --- the store ----------------------------------------------------------------------------

Table = tuple[list[str], list[tuple[object, ...]]]  # column names, rows by primary key


def _canon(value: object) -> object:
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def dump(engine: Engine) -> dict[str, Table]:
    """Every table of the store (its first schema): columns and rows, blobs as bytes.

    The tables fedvault defines are read through its models (no slow reflection);
    any other table (Alembic's) as it is.
    """
    out = {}
    with engine.connect() as conn:
        for name in sorted(inspect(engine).get_table_names()):
            table = Base.metadata.tables.get(name)
            if table is None:
                result = conn.execute(text(f'SELECT * FROM "{name}"'))
                rows = sorted(tuple(_canon(v) for v in r) for r in result)
                out[name] = (list(result.keys()), rows)
                continue
            result = conn.execute(select(table).order_by(*table.primary_key.columns))
            out[name] = ([c.name for c in table.columns], [tuple(map(_canon, r)) for r in result])
    return out


def _commit(store: RoundStore, job_id: int, number: int, outcome: RoundOutcome) -> None:
    """Commit a round as coordinator/server_app.py's run_job does."""
    assert outcome.model is not None
    store.commit_round(
        job_id,
        RoundCommit(
            number=number,
            model=_to_blob(number, outcome.model, outcome.total_weight),
            participations=tuple(outcome.participations),
            train_loss=outcome.train_loss,
            audit=tuple(outcome.audit),
            previous_evaluations=tuple(outcome.evaluations.hospitals),
        ),
    )


def run_job(
    url: str, engine_kwargs: dict[str, Any], world: World, rounds: list[RoundOutcome]
) -> dict[str, Table]:
    """A job's start, its initial model, its valid round 1, then ``rounds``; the dump."""
    with RoundStore(url, engine_kwargs=engine_kwargs) as store:
        job = store.open_job(JOB.job, JOB.to_dict())
        store.append_audit(
            AuditEvent(kind="job_started", actor="coordinator", detail={"after_round": 0}),
            job_id=job.id,
        )
        store.save_initial_model(job.id, _to_blob(0, ModelPayload(envelope=world.initial), 1.0))
        for number, outcome in enumerate([world.outcome(1), *rounds], start=1):
            _commit(store, job.id, number, outcome)
        assert store.verify_audit_chain() is None  # the chain is intact
        return dump(store.engine)


def _freeze(mp: pytest.MonkeyPatch) -> None:
    """One instant for every timestamp the store writes (the audit hashes include them)."""
    mp.setattr(store_module, "utcnow", lambda: NOW)
    mp.setattr(store_models, "utcnow", lambda: NOW)


#: Round ROUND + i is where KINDS[i] attacks.
ATTACKS = {ROUND + i: kind for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, world: World) -> dict[str, Table]:
    """The dump of the same job with no hostile reply in any round (on a SQLite file).

    Dumps are backend-independent (the store's types normalise timestamps and
    ids), so PostgreSQL is held to the very same rows.
    """
    url = sqlite_url(tmp_path_factory.mktemp("baseline") / "fedvault.sqlite")
    with pytest.MonkeyPatch.context() as mp:
        _freeze(mp)
        return run_job(url, {}, world, [world.outcome(r) for r in ATTACKS])


def _split(table: Table, column: str, value: str) -> tuple[Table, list[tuple[object, ...]]]:
    """The table without the rows whose ``column`` is ``value``, and those rows."""
    columns, rows = table
    i = columns.index(column)
    return (columns, [r for r in rows if r[i] != value]), [r for r in rows if r[i] == value]


def _drop_columns(table: Table, *names: str) -> Table:
    columns, rows = table
    keep = [i for i, c in enumerate(columns) if c not in names]
    return [columns[i] for i in keep], [tuple(r[i] for i in keep) for r in rows]


def _first_difference(got: dict[str, Table], expected: dict[str, Table]) -> str:
    for name in sorted(got.keys() | expected.keys()):
        g, e = got.get(name), expected.get(name)
        if g != e:
            if g is None or e is None or g[0] != e[0]:
                return f"table {name}: columns {g and g[0]} != {e and e[0]}"
            for a, b in zip(g[1], e[1], strict=False):
                if a != b:
                    return f"table {name} ({g[0]}): {str(a)[:300]} != {str(b)[:300]}"
            return f"table {name}: {len(g[1])} rows, expected {len(e[1])}"
    return ""


def test_every_hostile_kind_leaves_the_store_as_its_round_without_it(
    world: World,
    durable_backend: StoreTarget,
    baseline: dict[str, Table],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One job, one round per kind: valid replies plus the hostile one, committed as the
    ServerApp commits; the same job with the valid replies alone is the baseline."""
    expected = baseline
    _freeze(monkeypatch)
    outcomes, reasons = [], []
    for number, kind in ATTACKS.items():
        replies = [*world.replies(number), kind.build(world, number)]
        outcome = world.strategy(number).collect_train(number, replies)
        reasons.append(_rejection(outcome, kind, number))
        _same_aggregate(outcome, world.outcome(number))
        outcomes.append(outcome)
    got = run_job(durable_backend.url, durable_backend.engine_kwargs, world, outcomes)

    # The differences: per kind, one rejected participation row (none for a second reply
    # in a name that has one) and one audit event, both with the reason. Rejected rows
    # shift the ids of later participations, and the audit trail is a hash chain, so
    # after an inserted event ids and hashes differ: those columns are left out there.
    got["participations"], rejected = _split(got["participations"], "status", "rejected")
    got["participations"] = _drop_columns(got["participations"], "id")
    got["audit_events"], events = _split(got["audit_events"], "kind", "update_rejected")
    got["audit_events"] = _drop_columns(got["audit_events"], "id", "prev_hash", "hash")
    want = {
        **expected,
        "participations": _drop_columns(expected["participations"], "id"),
        "audit_events": _drop_columns(expected["audit_events"], "id", "prev_hash", "hash"),
    }
    assert got == want, _first_difference(got, want)
    columns = expected["participations"][0]
    rows = [r[columns.index("reason")] for r in rejected]
    assert rows == [r for r, k in zip(reasons, KINDS, strict=True) if k.row]
    columns = expected["audit_events"][0]
    assert [json.loads(str(e[columns.index("detail")]))["reason"] for e in events] == reasons


@pytest.fixture(scope="module")
def sqlite_file(tmp_path_factory: pytest.TempPathFactory, world: World) -> Path:
    """A closed SQLite store with a job whose round 1 is committed."""
    path = tmp_path_factory.mktemp("validation") / "fedvault.sqlite"
    run_job(sqlite_url(path), {}, world, [])
    return path


def _file_bytes(store_file: Path) -> dict[str, str]:
    """SHA-256 of the database and its write-ahead log (not of the -shm read index)."""
    files = [store_file, store_file.with_name(store_file.name + "-wal")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.exists()}


def test_validation_alone_does_not_touch_a_sqlite_file(world: World, sqlite_file: Path) -> None:
    closed = _file_bytes(sqlite_file)
    with RoundStore(sqlite_url(sqlite_file)) as store:  # open, as the coordinator holds it
        job = store.get_job(JOB.job)
        assert job is not None and store.last_committed_round(job.id) == 1
        opened = _file_bytes(sqlite_file)
        for kind in KINDS:
            outcome = world.strategy(ROUND).collect_train(ROUND, [kind.build(world, ROUND)])
            assert outcome.model is None or kind.second, kind.name
            assert _file_bytes(sqlite_file) == opened, kind.name
    assert _file_bytes(sqlite_file) == closed
