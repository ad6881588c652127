"""Typed messages end to end: the key ceremony's requests and replies, and refusal codes.

Every ceremony message round-trips through its one ``to_content`` /
``from_message`` pair; a missing or mistyped field is a clear
:class:`MalformedUpdateError`; every error a hospital refuses with maps to a
:class:`RefusalCode`; and the coordinator decides on the code, never on the
reason text. The last tests run a whole ceremony in-process: the coordinator's
:class:`KeyCeremony` against real ClientApps with kits from a real
``provision`` run, through a Grid that delivers each message at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedvault import errors
from fedvault.app.provision import provision
from fedvault.client.client_app import make_client_app
from fedvault.client.keys import KeyStore
from fedvault.client.site import HospitalIdentity
from fedvault.config import JobConfig, SecureAggregation
from fedvault.coordinator import server_app
from fedvault.coordinator.key_ceremony import KeyCeremony, KeyDirectory
from fedvault.coordinator.records import Participation
from fedvault.coordinator.server_app import CoordinatorSettings, run_job
from fedvault.coordinator.store import RoundStore
from fedvault.coordinator.store_engine import sqlite_url
from fedvault.coordinator.strategy import RoundOutcome
from fedvault.errors import (
    BudgetExhaustedError,
    FedvaultError,
    KeyMismatchError,
    MalformedUpdateError,
)
from fedvault.examples import get_example
from fedvault.kit import Kit
from fedvault.messages import (
    CEREMONY_KEY,
    CeremonyReply,
    EvalReply,
    HelloReply,
    HelloRequest,
    InstallKeyReply,
    InstallKeyRequest,
    RefusalCode,
    ReplyStatus,
    SealKeyReply,
    SealKeyRequest,
    TrainReply,
    ceremony_request,
    refusal_code,
    refusal_reason,
)
from fedvault.task_registry import load_task

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "consortium.toml"


def _message(content: RecordDict, *, node: int = 7) -> Message:
    """A QUERY message as the other side receives it (with the metadata Flower delivers)."""
    metadata = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=node,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type=MessageType.QUERY,
    )
    return Message(content=content, metadata=metadata)


def _edited(content: RecordDict, edit: Callable[[dict[str, Any]], object]) -> Message:
    fields = dict(content.config_records[CEREMONY_KEY])
    edit(fields)
    return _message(RecordDict({CEREMONY_KEY: ConfigRecord(fields)}))


# --- round trips ---------------------------------------------------------------------

REQUESTS = [
    HelloRequest(),
    SealKeyRequest(epoch=2, recipients=("hospital-b", "hospital-c")),
    SealKeyRequest(epoch=1),
    InstallKeyRequest(epoch=3, envelope=b"\x00sealed", custodian_cert=b"PEM", fingerprint="ab12"),
]

REFUSED = {"status": ReplyStatus.REFUSED, "reason": "KeyMismatchError: no kit"}
REPLIES = [
    CeremonyReply(hospital="hospital-b", code=RefusalCode.MALFORMED, **REFUSED),
    HelloReply(hospital="hospital-a", epochs=(1, 2), custodian=True),
    HelloReply(hospital="hospital-b"),
    HelloReply(hospital="hospital-b", code=RefusalCode.INTERNAL, **REFUSED),
    SealKeyReply(
        hospital="hospital-a",
        public_context=b"public",
        custodian_cert=b"PEM",
        envelopes={"hospital-b": b"env-b", "hospital-c": b"env-c"},
    ),
    SealKeyReply(hospital="hospital-a", public_context=b"public", custodian_cert=b"PEM"),
    SealKeyReply(hospital="hospital-b", code=RefusalCode.KEY_MISMATCH, **REFUSED),
    InstallKeyReply(hospital="hospital-c", fingerprint="ab12"),
    InstallKeyReply(hospital="hospital-c", code=RefusalCode.KEY_MISMATCH, **REFUSED),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(request_: Any) -> None:
    msg = _message(request_.to_content())
    assert type(request_).from_message(msg) == request_
    assert ceremony_request(msg) == request_  # the hospital's dispatch on the action


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: f"{type(r).__name__}-{r.status}")
def test_every_reply_round_trips(reply: CeremonyReply) -> None:
    assert type(reply).from_message(_message(reply.to_content())) == reply


@pytest.mark.parametrize("cls", [HelloReply, SealKeyReply, InstallKeyReply, CeremonyReply])
def test_a_bare_refusal_parses_as_every_reply_type(cls: type[CeremonyReply]) -> None:
    # What a hospital sends when it cannot even parse the request.
    refusal = CeremonyReply(hospital="hospital-b", code=RefusalCode.MALFORMED, **REFUSED)
    got = cls.from_message(_message(refusal.to_content()))
    assert isinstance(got, cls)
    assert (got.status, got.code, got.reason) == (
        ReplyStatus.REFUSED,
        RefusalCode.MALFORMED,
        REFUSED["reason"],
    )


def test_train_and_eval_refusals_carry_their_code() -> None:
    train = TrainReply(
        hospital="hospital-c",
        status=ReplyStatus.REFUSED,
        reason="PolicyRefusalError: no",
        code=RefusalCode.POLICY,
        delta=1e-5,
    )
    msg = _message(train.to_content())
    msg.metadata.__dict__["_message_type"] = MessageType.TRAIN
    assert TrainReply.from_message(msg) == train
    evaluated = EvalReply(
        hospital="hospital-c", status=ReplyStatus.REFUSED, reason="x", code=RefusalCode.DATA
    )
    msg = _message(evaluated.to_content())
    msg.metadata.__dict__["_message_type"] = MessageType.EVALUATE
    assert EvalReply.from_message(msg) == evaluated


# --- what does not parse ---------------------------------------------------------------


def _drop(key: str) -> Callable[[dict[str, Any]], object]:
    return lambda fields: fields.pop(key)


def _set(key: str, value: object) -> Callable[[dict[str, Any]], object]:
    return lambda fields: fields.__setitem__(key, value)


GOOD_SEAL = SealKeyReply(
    hospital="hospital-a",
    public_context=b"public",
    custodian_cert=b"PEM",
    envelopes={"hospital-b": b"env-b"},
)
_HELLO, _SEAL, _INSTALL = (r.to_content() for r in (REQUESTS[0], REQUESTS[1], REQUESTS[3]))
_REFUSAL, _OK_HELLO, _OK_INSTALL = (r.to_content() for r in (REPLIES[0], REPLIES[1], REPLIES[7]))
_REQ = ceremony_request  # the hospital's parser of any request


def _bad(what: str, msg: object, parse: Callable[[Message], object], match: str) -> Any:
    return pytest.param(msg, parse, match, id=what)


BAD = [
    _bad("no action", _edited(_HELLO, _drop("action")), _REQ, "lacks 'action'"),
    _bad("unknown action", _edited(_HELLO, _set("action", "rm")), _REQ, "action 'rm'"),
    _bad("wrong action", _HELLO, SealKeyRequest.from_message, "'hello' request, not"),
    _bad("seal without epoch", _edited(_SEAL, _drop("epoch")), _REQ, "lacks 'epoch'"),
    _bad("epoch as text", _edited(_SEAL, _set("epoch", "2")), _REQ, "epoch must be an integer"),
    _bad("epoch zero", _edited(_SEAL, _set("epoch", 0)), _REQ, "key epoch must be >= 1"),
    _bad("path", _edited(_SEAL, _set("recipients", ["../x"])), _REQ, "is not a hospital name"),
    _bad("twice", _edited(_SEAL, _set("recipients", ["h", "h"])), _REQ, "names a hospital twice"),
    _bad("not a list", _edited(_SEAL, _set("recipients", "h")), _REQ, "recipients must be a list"),
    _bad("no envelope", _edited(_INSTALL, _drop("envelope")), _REQ, "lacks 'envelope'"),
    _bad("text envelope", _edited(_INSTALL, _set("envelope", "x")), _REQ, "envelope must be non-"),
    _bad("no cert", _edited(_INSTALL, _set("custodian-cert", b"")), _REQ, "custodian-cert must"),
    _bad("no fingerprint", _edited(_INSTALL, _set("fingerprint", "")), _REQ, "empty fingerprint"),
    _bad(
        "extra record",
        RecordDict({CEREMONY_KEY: ConfigRecord({"action": "hello"}), "x": ConfigRecord()}),
        _REQ,
        "unexpected records ['x']",
    ),
    _bad("elsewhere", RecordDict({"o": ConfigRecord({"action": "hello"})}), _REQ, "unexpected"),
    _bad("no hospital", _edited(_OK_HELLO, _drop("hospital")), HelloReply.from_message, "lacks"),
    _bad("no epochs", _edited(_OK_HELLO, _drop("epochs")), HelloReply.from_message, "'epochs'"),
    _bad(
        "custodian as int",
        _edited(_OK_HELLO, _set("custodian", 1)),
        HelloReply.from_message,
        "custodian must be a boolean",
    ),
    _bad(
        "unknown status",
        _edited(_OK_HELLO, _set("status", "maybe")),
        HelloReply.from_message,
        "status 'maybe' is unknown",
    ),
    _bad(
        "unknown code",
        _edited(_REFUSAL, _set("code", "bored")),
        CeremonyReply.from_message,
        "code 'bored' is unknown",
    ),
    _bad(
        "code on an accepted reply",
        _edited(_OK_HELLO, _set("code", "policy")),
        HelloReply.from_message,
        "on an accepted reply",
    ),
    _bad(
        "seal without public context",
        _edited(GOOD_SEAL.to_content(), _drop("public-context")),
        SealKeyReply.from_message,
        "lacks 'public-context'",
    ),
    _bad(
        "more recipients than envelopes",
        _edited(GOOD_SEAL.to_content(), _set("recipients", ["hospital-b", "hospital-c"])),
        SealKeyReply.from_message,
        "names 2 recipients but carries 1 envelopes",
    ),
    _bad(
        "empty envelope",
        _edited(GOOD_SEAL.to_content(), _set("envelopes", [b""])),
        SealKeyReply.from_message,
        "envelopes[hospital-b] must be non-empty bytes",
    ),
    _bad(
        "install reply without fingerprint",
        _edited(_OK_INSTALL, _drop("fingerprint")),
        InstallKeyReply.from_message,
        "lacks 'fingerprint'",
    ),
]


@pytest.mark.parametrize(("content", "parse", "match"), BAD)
def test_a_missing_or_mistyped_field_is_a_clear_malformed_error(
    content: RecordDict | Message, parse: Callable[[Message], object], match: str
) -> None:
    msg = content if isinstance(content, Message) else _message(content)
    with pytest.raises(MalformedUpdateError, match=re.escape(match)):
        parse(msg)


def test_a_reply_of_another_message_type_is_malformed() -> None:
    msg = _message(REPLIES[1].to_content())
    msg.metadata.__dict__["_message_type"] = MessageType.TRAIN
    with pytest.raises(MalformedUpdateError, match="unexpected message type 'train'"):
        HelloReply.from_message(msg)


def test_a_refusal_without_a_code_is_from_an_older_hospital_and_unknown() -> None:
    old = _edited(REPLIES[0].to_content(), _drop("code"))
    assert CeremonyReply.from_message(old).code is RefusalCode.UNKNOWN
    # Built without one, a refusal says UNKNOWN too, on both sides of the wire.
    reply = TrainReply(hospital="h", status=ReplyStatus.REFUSED, reason="budget")
    assert reply.code is RefusalCode.UNKNOWN
    with pytest.raises(MalformedUpdateError, match="carries refusal code"):
        HelloReply(hospital="h", code=RefusalCode.POLICY)  # an accepted reply has none


# --- refusal codes -----------------------------------------------------------------------


def _error_classes() -> list[type[FedvaultError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, FedvaultError) and cls.__module__ == errors.__name__
    ]


EXPECTED_CODES = {
    "BudgetExhaustedError": RefusalCode.BUDGET_EXHAUSTED,
    "PolicyRefusalError": RefusalCode.POLICY,
    "TaskMismatchError": RefusalCode.TASK_MISMATCH,
    "InvalidConfigError": RefusalCode.CONFIG,
    "KeyMismatchError": RefusalCode.KEY_MISMATCH,
    "SecretKeyExposureError": RefusalCode.KEY_EXPOSURE,
    "MalformedUpdateError": RefusalCode.MALFORMED,
    "DataError": RefusalCode.DATA,
    "StoreError": RefusalCode.INTERNAL,
    "FedvaultError": RefusalCode.INTERNAL,
}


def test_every_error_a_hospital_can_refuse_with_has_a_code() -> None:
    classes = _error_classes()
    # A new error class must be given its code here (and in messages._REFUSAL_CODES).
    assert sorted(c.__name__ for c in classes) == sorted(EXPECTED_CODES)
    for cls in classes:
        code = refusal_code(cls("x"))
        assert code is EXPECTED_CODES[cls.__name__], cls
        assert code is not RefusalCode.UNKNOWN  # UNKNOWN is only ever parsed


def test_subclasses_keep_their_parents_code_and_anything_else_is_internal() -> None:
    class SpentElsewhereError(BudgetExhaustedError):
        pass

    assert refusal_code(SpentElsewhereError("x")) is RefusalCode.BUDGET_EXHAUSTED
    assert refusal_code(KeyError("epoch")) is RefusalCode.INTERNAL
    assert refusal_reason(BudgetExhaustedError("spent")) == "BudgetExhaustedError: spent"


# --- the coordinator decides on the code -------------------------------------------------


def _refused(code: RefusalCode | None, reason: str, hospital: str = "hospital-c") -> Participation:
    return Participation(hospital=hospital, status="refused", reason=reason, code=code)


def test_the_final_refusal_decision_reads_the_code_never_the_text() -> None:
    final = server_app._final_refusal
    assert final([_refused(RefusalCode.BUDGET_EXHAUSTED, "spent")])
    assert final([_refused(RefusalCode.POLICY, "no"), _refused(RefusalCode.CONFIG, "x", "h2")])
    # The text says budget, the code does not: retried.
    assert not final([_refused(RefusalCode.INTERNAL, "BudgetExhaustedError: spent")])
    assert not final([_refused(RefusalCode.UNKNOWN, "PolicyRefusalError: unknown task")])
    assert not final([_refused(RefusalCode.KEY_MISMATCH, "TaskMismatchError: x")])
    # A failure or a rejection is never final, whatever its reason says.
    failed = Participation(hospital="h2", status="failed", reason="BudgetExhaustedError")
    assert not final([_refused(RefusalCode.BUDGET_EXHAUSTED, "spent"), failed])
    assert not final([])


class _Runner:
    """Stands in for the ServerApp's round runner: every attempt gets one refusal."""

    attempts = 0
    refusal: Participation

    def __init__(self, grid: object, settings: CoordinatorSettings, store: object, job: int):
        self.public, self.key_epoch, self.summary = None, 0, ""
        self.eval_spec = settings.eval_spec
        self.started_at: dict[int, object] = {}  # the real runner's: round -> attempt start

    def ensure_keys(self) -> None:
        pass

    def train(self, number: int, model: object) -> RoundOutcome:
        type(self).attempts += 1
        return RoundOutcome(participations=[type(self).refusal])


@pytest.mark.parametrize(
    ("code", "reason", "attempts"),
    [
        (RefusalCode.BUDGET_EXHAUSTED, "the text says nothing", 1),
        (RefusalCode.POLICY, "BudgetExhaustedError: the text lies", 1),
        (RefusalCode.INTERNAL, "BudgetExhaustedError: the text lies", 3),
        (RefusalCode.UNKNOWN, "BudgetExhaustedError: an older hospital", 3),
    ],
)
def test_the_server_app_retries_a_round_by_the_refusal_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: RefusalCode, reason: str, attempts: int
) -> None:
    runner = type("Runner", (_Runner,), {"refusal": _refused(code, reason)})
    monkeypatch.setattr(server_app, "_RoundRunner", runner)
    job = JobConfig.for_example(
        get_example("breast-cancer"),
        hospitals=1,
        rounds=1,
        max_round_attempts=3,
        secure_aggregation=SecureAggregation.NONE,
    )
    settings = CoordinatorSettings(
        job=job, store_url=sqlite_url(tmp_path / "store.db"), task=load_task("breast-cancer")
    )
    assert run_job(None, settings) == "failed"  # type: ignore[arg-type]
    assert runner.attempts == attempts


# --- a whole ceremony, in-process ----------------------------------------------------------


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    shutil.copy(EXAMPLE, root / "c.toml")
    provision(root / "c.toml", root / "out")
    return root / "out"


@pytest.fixture
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower sets in a ServerApp process (the coordinator builds messages there)."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


class _Sites:
    """A hospital's identity by node id (the ceremony needs nothing else)."""

    def __init__(self, identities: dict[int, HospitalIdentity]) -> None:
        self.identities = identities

    def identity(self, context: Context) -> HospitalIdentity:
        return self.identities[context.node_id]

    def site(self, context: Context, job: JobConfig) -> Any:
        raise AssertionError("the ceremony never resolves a site")


class _Grid:
    """Delivers each message to its node's ClientApp and returns the replies at once."""

    def __init__(
        self,
        identities: dict[int, HospitalIdentity],
        handlers: dict[int, Callable[[Message], Message]] | None = None,
    ) -> None:
        self.app = make_client_app(_Sites(identities))  # type: ignore[arg-type]
        self.nodes = sorted(identities)
        self.handlers = handlers or {}  # nodes that answer otherwise than their ClientApp

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float) -> Iterator[Message]:
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            if node in self.handlers:
                yield self.handlers[node](msg)
                continue
            context = Context(
                run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={}
            )
            yield self.app(msg, context)


def _identities(kits: Path, tmp_path: Path, **kit_less: bool) -> dict[int, HospitalIdentity]:
    out = {}
    for node, name in enumerate(("hospital-a", "hospital-b", "hospital-c"), start=1):
        kit = None if kit_less.get(name.replace("-", "_")) else Kit.load(kits / "hospitals" / name)
        out[node] = HospitalIdentity(name=name, keys=KeyStore(tmp_path / name / "keys"), kit=kit)
    return out


def _ceremony(tmp_path: Path, store: RoundStore, enrolled: dict[int, str]) -> KeyCeremony:
    return KeyCeremony(
        KeyDirectory(tmp_path / "coordinator" / "keys"),
        custodian="hospital-a",
        store=store,
        timeout_s=5.0,
        enrolled=enrolled,
    )


def test_a_whole_ceremony_installs_the_key_everywhere(
    kits: Path, tmp_path: Path, server_identity: None
) -> None:
    identities = _identities(kits, tmp_path)
    with RoundStore(sqlite_url(tmp_path / "store.db")) as store:
        ceremony = _ceremony(tmp_path, store, {n: i.name for n, i in identities.items()})
        public = ceremony.ensure(_Grid(identities))  # type: ignore[arg-type]
        kinds = [(e.kind, e.actor) for e in store.audit_events()]
    assert not public.is_private
    for identity in identities.values():
        assert identity.keys.get(1).fingerprint == public.fingerprint
    assert ("key_epoch_ready", "hospital-a") in kinds
    assert {a for k, a in kinds if k == "key_installed"} == {"hospital-b", "hospital-c"}
    assert ceremony.hospitals == {1: "hospital-a", 2: "hospital-b", 3: "hospital-c"}


def test_a_refused_install_is_audited_with_its_code_and_a_malformed_hello_ignored(
    kits: Path, tmp_path: Path, server_identity: None
) -> None:
    identities = _identities(kits, tmp_path, hospital_c=True)  # c lost its kit
    bad_hello = HelloReply(hospital="hospital-b", epochs=(1,)).to_content()
    bad_hello.config_records[CEREMONY_KEY]["epochs"] = ["1"]

    def garbage(msg: Message) -> Message:
        if ceremony_request(msg) == HelloRequest():
            return Message(bad_hello, reply_to=msg)
        raise AssertionError("a node whose hello did not parse is asked nothing else")

    grid = _Grid(identities, handlers={2: garbage})
    with RoundStore(sqlite_url(tmp_path / "store.db")) as store:
        ceremony = _ceremony(tmp_path, store, {n: i.name for n, i in identities.items()})
        ceremony.ensure(grid)  # type: ignore[arg-type]
        events = {(e.kind, e.actor): dict(e.detail) for e in store.audit_events()}
    rejected = events[("key_ceremony_reply_rejected", "hospital-b")]
    assert "epochs must be an integer" in rejected["reason"]
    refused = events[("key_install_refused", "hospital-c")]
    assert refused["code"] == RefusalCode.KEY_MISMATCH.value
    assert refused["reason"].startswith("KeyMismatchError: hospital-c has no kit")
    assert ("key_installed", "hospital-c") not in events
    assert 2 not in ceremony._checked and 3 not in ceremony._checked


def test_a_custodian_refusal_stops_the_ceremony_with_its_code(
    kits: Path, tmp_path: Path, server_identity: None
) -> None:
    identities = _identities(kits, tmp_path)
    # The coordinator asks for an envelope the custodian's kit knows nothing of.
    identities[4] = HospitalIdentity(
        name="hospital-z", keys=KeyStore(tmp_path / "z" / "keys"), kit=identities[2].kit
    )
    grid = _Grid(identities)
    with RoundStore(sqlite_url(tmp_path / "store.db")) as store:
        ceremony = _ceremony(tmp_path, store, {n: i.name for n, i in identities.items()})
        with pytest.raises(KeyMismatchError, match=r"refused the ceremony \[key_mismatch\]: "):
            ceremony.ensure(grid)  # type: ignore[arg-type]


def test_participation_code_belongs_to_refusals_only() -> None:
    with pytest.raises(MalformedUpdateError, match="code"):
        Participation(hospital="h", status="failed", code=RefusalCode.POLICY)
    assert dataclasses.replace(_refused(RefusalCode.POLICY, "x")).code is RefusalCode.POLICY
