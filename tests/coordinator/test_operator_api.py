"""The operator API over real mutual TLS: roles, refusals, audit, job control.

One gRPC server on 127.0.0.1 (a free port written into a copy of
``examples/consortium.toml`` before provisioning), real certificates from
``fedvault provision``, and a SQLite file store seeded through the RoundStore
API with two committed, evaluated rounds of job ``study``.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from rich.console import Console

from fedvault.app.job_view import jobs_json, render_jobs
from fedvault.app.operator_client import (
    OperatorApiError,
    OperatorClient,
    OperatorPermissionError,
    OperatorUnavailableError,
)
from fedvault.app.provision import ProvisionResult, provision
from fedvault.app.status_view import render_status
from fedvault.coordinator.daemon import parse_job
from fedvault.coordinator.operator_api import ACCESS, JobIntake, serve
from fedvault.coordinator.records import HospitalEval, ModelBlob, Participation, RoundCommit
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.errors import InvalidConfigError
from fedvault.kit import Kit, KitError
from fedvault.privacy.pki import (
    Role,
    certificate_to_pem,
    create_ca,
    issue_client_cert,
    private_key_to_pem,
)
from fedvault.proto import admin_pb2

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "consortium.toml"
CONFIG = {"rounds": 5, "privacy": {"epsilon": 3.0, "delta": 1e-5}}
HOSPITALS = ("hospital-a", "hospital-b")
# (samples, sample rate) per hospital; ε after round n is 0.4 n + 0.1 i.
SAMPLES = {"hospital-a": 300, "hospital-b": 100}
# Per-round evaluations: (accuracy, loss, samples) per hospital; hospital-c only
# evaluates round 1 (it was not asked to train).
EVALS = {
    1: {
        "hospital-a": (0.80, 0.50, 60),
        "hospital-b": (0.70, 0.70, 20),
        "hospital-c": (0.75, 0.60, 20),
    },
    2: {"hospital-a": (0.90, 0.30, 60), "hospital-b": (0.86, 0.40, 20)},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _epsilon(hospital: str, number: int) -> float:
    return 0.4 * number + 0.1 * (HOSPITALS.index(hospital) + 1)


def _commit(number: int) -> RoundCommit:
    ok = [
        Participation(
            hospital=h,
            status="ok",
            samples=SAMPLES[h],
            train_loss=1.0 / number,
            epsilon=_epsilon(h, number),
            delta=1e-5,
            noise_multiplier=1.1,
            sample_rate=0.02,
            steps=15 * number,
            accountant="prv",
            bytes_received=4096,
        )
        for h in HOSPITALS
    ]
    refused = [Participation(hospital="hospital-c", status="refused", reason="budget exhausted")]
    parts = (*ok, *(refused if number == 2 else []))
    blob = ModelBlob(number, "bfv", b"ciphertext-%d" % number, float(sum(SAMPLES.values())))
    return RoundCommit(number=number, model=blob, participations=parts, train_loss=1.0 / number)


@dataclass(frozen=True)
class Env:
    prov: ProvisionResult
    address: str
    store_url: str

    def client(self, operator: str) -> OperatorClient:
        return OperatorClient(Kit.load(self.prov.operator_kits[operator]), timeout=5)

    def pem_client(self, *, cert: bytes | None, key: bytes | None) -> OperatorClient:
        ca = (self.prov.ca_dir / "ca.pem").read_bytes()
        return OperatorClient.from_pem(
            self.address, ca_pem=ca, cert_pem=cert, key_pem=key, timeout=5
        )

    def store(self) -> RoundStore:
        return RoundStore(self.store_url)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("operator-api")
    port = _free_port()
    toml = EXAMPLE.read_text().replace("127.0.0.1:9093", f"127.0.0.1:{port}")
    (root / "consortium.toml").write_text(toml)
    prov = provision(root / "consortium.toml", root / "out")
    url = sqlite_url(root / "fedvault.sqlite")
    with RoundStore(url) as store:
        for name in ("study", "to-control"):
            job = store.open_job(name, CONFIG)
            for number in (1, 2):
                store.commit_round(job.id, _commit(number))
                evals = [
                    HospitalEval(hospital=h, accuracy=a, loss=loss, samples=n)
                    for h, (a, loss, n) in EVALS[number].items()
                ]
                store.record_evaluation(job.id, number, evaluations=evals)
    coordinator = Kit.load(prov.coordinator_kit)
    server = serve(url, coordinator)
    yield Env(prov, coordinator.operator_api_address, url)
    server.stop(None).wait(5)


def _audit(env: Env, kind: str) -> list[tuple[str, dict[str, object]]]:
    with env.store() as store:
        return [(e.actor, dict(e.detail)) for e in store.audit_events() if e.kind == kind]


# -- the matrix and the generated code ----------------------------------------------


def test_access_matrix_covers_every_rpc_and_is_ordered() -> None:
    service = admin_pb2.DESCRIPTOR.services_by_name["OperatorService"]
    assert set(ACCESS) == {m.name for m in service.methods}
    assert {name for name, rule in ACCESS.items() if rule.required is Role.GUEST} == {
        "GetAccess",
        "GetJobStatus",
        "ListJobs",
    }
    # The issue's "admin and engineer roles" run the job queue; an auditor runs nothing.
    assert {n for n, r in ACCESS.items() if r.required is Role.ENGINEER} == {
        "ListRounds",
        "ListParticipants",
        "StopJob",
        "PauseJob",
        "ResumeJob",
        "SubmitJob",
    }
    assert not [n for n, r in ACCESS.items() if r.required is Role.ADMIN]


def _code_lines(text: str) -> list[str]:
    """Drop comments and the protobuf runtime version check (they vary by protoc)."""
    lines, skipping = [], False
    for line in text.splitlines():
        skipping = skipping or line.startswith("_runtime_version.ValidateProtobufRuntimeVersion(")
        if not skipping and not line.lstrip().startswith("#"):
            lines.append(line)
        if skipping and line.strip() == ")":
            skipping = False
    return lines


def test_generated_code_in_sync(tmp_path: Path) -> None:
    proto = REPO / "proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(proto)]
        + [f"--{kind}_out={tmp_path}" for kind in ("python", "pyi", "grpc_python")]
        + [str(proto / "admin.proto")],
        check=True,
        capture_output=True,
    )
    grpc_file = tmp_path / "admin_pb2_grpc.py"
    text = grpc_file.read_text()
    fixed = re.sub(
        r"^import admin_pb2 as admin__pb2$",
        "from fedvault.proto import admin_pb2 as admin__pb2",
        text,
        flags=re.M,
    )
    assert fixed != text  # the README's sed has something to fix
    grpc_file.write_text(fixed)
    for name in ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py"):
        fresh = _code_lines((tmp_path / name).read_text())
        assert len(fresh) > 20
        assert fresh == _code_lines((proto / name).read_text()), f"proto/{name} is stale"


# -- roles ------------------------------------------------------------------------------


def test_admin_reads_everything(env: Env) -> None:
    with env.client("alice") as c:
        access = c.access()
        assert (access.common_name, access.role) == ("alice", Role.ADMIN)
        assert all(m.allowed for m in access.methods)

        status = c.job_status("study")
        assert (status.status, status.paused) == ("running", False)
        assert (status.rounds_committed, status.rounds_planned) == (2, 5)
        # Round 2 evaluated: (0.90 * 60 + 0.86 * 20) / 80 = 0.89.
        assert status.final_accuracy == pytest.approx(0.89, abs=1e-12)
        assert status.final_loss == pytest.approx((0.3 * 60 + 0.4 * 20) / 80)
        assert status.epsilon_max == pytest.approx(_epsilon("hospital-b", 2))  # 1.0
        assert (status.delta, status.epsilon_budget) == (1e-5, 3.0)

        rounds = c.rounds("study")
        assert [(r.round, r.status, r.participants, r.failures) for r in rounds] == [
            (1, "committed", 2, 0),
            (2, "committed", 2, 1),
        ]
        assert rounds[0].accuracy == pytest.approx((0.8 * 60 + 0.7 * 20 + 0.75 * 20) / 100)
        assert rounds[1].train_loss == pytest.approx(0.5)

        people = c.participants(2, "study")
        by_name = {p.hospital: p for p in people.participants}
        assert set(by_name) == {"hospital-a", "hospital-b", "hospital-c"}
        assert by_name["hospital-a"].epsilon == pytest.approx(0.9)
        assert by_name["hospital-a"].eval_accuracy == pytest.approx(0.9)
        assert (by_name["hospital-c"].status, by_name["hospital-c"].reason) == (
            "refused",
            "budget exhausted",
        )
        assert by_name["hospital-c"].epsilon is None

        first = {p.hospital: p for p in c.participants(1, "study").participants}
        assert [first[h].status for h in sorted(first)] == ["ok", "ok", "evaluated"]
        only_eval = first["hospital-c"]
        assert (only_eval.eval_accuracy, only_eval.eval_loss, only_eval.samples) == (0.75, 0.6, 0)
        assert only_eval.epsilon is None and only_eval.train_loss is None

        ledger = c.privacy_ledger("study")
        assert ledger.epsilon_budget == 3.0
        assert [(e.hospital, e.round, e.steps) for e in ledger.entries] == [
            (h, n, 15 * n) for n in (1, 2) for h in HOSPITALS
        ]
        assert [e.epsilon for e in ledger.entries] == pytest.approx([0.5, 0.6, 0.9, 1.0])
        assert {(e.noise_multiplier, e.sample_rate, e.delta) for e in ledger.entries} == {
            (1.1, 0.02, 1e-5)
        }

        log = c.audit_log("study", limit=3)
        assert log.chain_intact and log.first_broken_id is None
        assert len(log.events) == 3 and log.total > 3
        assert [e.id for e in log.events] == sorted(e.id for e in log.events)
        everything = c.audit_log(limit=10_000)
        assert everything.total == len(everything.events) >= log.total
        kinds = {e.kind for e in everything.events}
        assert {"job.created", "round.committed"} <= kinds
        for prev, event in zip(everything.events, everything.events[1:], strict=False):
            assert event.prev_hash == prev.hash  # the chain, as served
        assert json.loads(everything.events[0].detail_json)["config"] == CONFIG


def test_default_job_is_the_most_recently_updated(env: Env) -> None:
    with env.store() as store:
        store.open_job("fresh", {"rounds": 1})
    with env.client("dave") as c:
        status = c.job_status()
    assert (status.job, status.rounds_committed, status.final_accuracy) == ("fresh", 0, None)
    assert status.epsilon_max is None and status.epsilon_budget is None


def test_admin_stops_pauses_and_resumes(env: Env) -> None:
    with env.client("alice") as c:
        paused = c.pause_job("to-control", reason="maintenance window")
        assert (paused.status, paused.paused) == ("running", True)
        with env.store() as store:
            assert store.requested_control("to-control") == "pause"
        with pytest.raises(OperatorApiError, match="already paused"):
            c.pause_job("to-control")
        assert c.resume_job("to-control").paused is False
        with pytest.raises(OperatorApiError, match="is not paused"):
            c.resume_job("to-control")
        with env.store() as store:
            assert store.requested_control("to-control") == "run"
        stopped = c.stop_job("to-control", reason="enough")
        assert stopped.status == "stopped"
        with pytest.raises(OperatorApiError, match="is stopped; only a queued or running job"):
            c.stop_job("to-control")
        with pytest.raises(OperatorApiError, match="runs no job queue"):
            c.resume_job("to-control")  # a stopped job is queued again by a coordinator only
    with env.store() as store:
        job = store.get_job("to-control")
        assert job is not None and job.status == "stopped"
        assert store.requested_control("to-control") == "stop"
        assert store.requested_control("study") == "run"
    actions = [(a, d["method"], d["reason"]) for a, d in _audit(env, "operator_action")]
    assert actions == [
        ("alice", "PauseJob", "maintenance window"),
        ("alice", "ResumeJob", ""),
        ("alice", "StopJob", "enough"),
    ]


def test_auditor_reads_ledger_and_audit_log_but_cannot_stop(env: Env) -> None:
    with env.client("carol") as c:
        assert len(c.privacy_ledger("study").entries) == 4
        assert c.audit_log("study").chain_intact
        with pytest.raises(OperatorPermissionError, match="role auditor may not list the rounds"):
            c.rounds("study")
        with pytest.raises(OperatorPermissionError) as denied:
            c.stop_job("study")
    assert denied.value.required_role is Role.ENGINEER
    with env.store() as store:
        job = store.get_job("study")
        assert job is not None and job.status == "running"


def test_engineer_reads_operations_and_ledger_and_controls_jobs(env: Env) -> None:
    with env.store() as store:
        store.open_job("engineered", {"rounds": 1})
    with env.client("bob") as c:
        assert len(c.rounds("study")) == 2
        assert len(c.participants(2, "study").participants) == 3
        assert len(c.privacy_ledger("study").entries) == 4
        assert c.audit_log("study").total > 0
        assert c.pause_job("engineered").paused
        assert not c.resume_job("engineered").paused
        assert c.stop_job("engineered", reason="bad data").status == "stopped"
    actions = [(a, d["method"], d["role"]) for a, d in _audit(env, "operator_action")][-3:]
    assert actions == [(("bob", m, "engineer")) for m in ("PauseJob", "ResumeJob", "StopJob")]


def test_guest_sees_final_metrics_only_and_denials_are_audited(env: Env) -> None:
    before = len(_audit(env, "operator_denied"))
    with env.client("dave") as c:
        status = c.job_status("study")
        assert status.final_accuracy == pytest.approx(0.89)
        with pytest.raises(OperatorPermissionError) as denied:
            c.audit_log("study")
        message = str(denied.value)
        assert message.startswith("role guest may not read the audit log")
        assert "ask an auditor, an engineer or an admin" in message
        assert denied.value.required_role is Role.AUDITOR
        for read in (c.rounds, c.privacy_ledger, c.stop_job):
            with pytest.raises(OperatorPermissionError):
                read("study")
    denials = _audit(env, "operator_denied")[before:]
    assert [(a, d["method"], d["role"]) for a, d in denials] == [
        ("dave", "GetAuditLog", "guest"),
        ("dave", "ListRounds", "guest"),
        ("dave", "GetPrivacyLedger", "guest"),
        ("dave", "StopJob", "guest"),
    ]
    with env.store() as store:
        assert store.verify_audit_chain() is None
        job = store.get_job("study")
        assert job is not None and job.status == "running"


# -- authentication -----------------------------------------------------------------------


def test_hospital_certificate_is_denied(env: Env) -> None:
    kit = env.prov.hospital_kits["hospital-a"]
    client = env.pem_client(
        cert=(kit / "hospital.pem").read_bytes(), key=(kit / "hospital.key").read_bytes()
    )
    with client, pytest.raises(OperatorPermissionError, match="carries no operator role"):
        client.job_status("study")
    actor, detail = _audit(env, "operator_denied")[-1]
    assert (actor, detail["method"], detail["role"]) == ("hospital-a", "GetJobStatus", None)
    with pytest.raises(KitError, match="takes an operator kit"):
        OperatorClient(Kit.load(kit))


def test_certificate_from_another_ca_cannot_connect(env: Env) -> None:
    rogue_ca, rogue_key = create_ca("rogue")
    cert, key = issue_client_cert(rogue_ca, rogue_key, "alice", role=Role.ADMIN)
    denials = len(_audit(env, "operator_denied"))
    client = env.pem_client(cert=certificate_to_pem(cert), key=private_key_to_pem(key))
    with client, pytest.raises(OperatorUnavailableError, match="unreachable"):
        client.job_status("study")
    assert len(_audit(env, "operator_denied")) == denials  # refused by TLS, before any RPC


def test_no_client_certificate_cannot_connect(env: Env) -> None:
    with (
        env.pem_client(cert=None, key=None) as client,
        pytest.raises(OperatorUnavailableError, match="fedvault coordinator start"),
    ):
        client.job_status("study")


def test_unreachable_server_names_the_address(env: Env) -> None:
    address = f"127.0.0.1:{_free_port()}"
    kit = Kit.load(env.prov.operator_kits["alice"])
    with (
        OperatorClient(kit, address=address, timeout=2) as c,
        pytest.raises(OperatorUnavailableError) as exc,
    ):
        c.job_status()
    assert f"operator API at {address} unreachable" in str(exc.value)


def test_serve_refuses_other_kits_and_a_taken_port(env: Env) -> None:
    with pytest.raises(InvalidConfigError, match="serves with the coordinator kit"):
        serve(env.store_url, Kit.load(env.prov.operator_kits["alice"]))
    with pytest.raises(InvalidConfigError, match="cannot bind the operator API"):
        serve(env.store_url, Kit.load(env.prov.coordinator_kit))


def test_unknown_job_and_round(env: Env) -> None:
    with env.client("alice") as c:
        with pytest.raises(OperatorApiError, match="no job 'nope'"):
            c.job_status("nope")
        with pytest.raises(OperatorApiError, match="has no round 7"):
            c.participants(7, "study")


def test_no_request_can_claim_a_role() -> None:
    # The role comes from the certificate only: no request message has a field for it.
    requests = [
        m for m in admin_pb2.DESCRIPTOR.message_types_by_name.values() if m.name.endswith("Request")
    ]
    assert len(requests) == 9
    for message in requests:
        assert not any("role" in f for f in message.fields_by_name), message.name


# -- fedvault status ----------------------------------------------------------------------


def _render(env: Env, operator: str) -> str:
    console = Console(record=True, width=200, force_terminal=False)
    with env.client(operator) as c:
        render_status(c, console, job="study")
    return console.export_text()


def test_status_view_for_admin_and_guest(env: Env) -> None:
    before = len(_audit(env, "operator_denied"))
    admin = _render(env, "alice")
    assert "operator alice (role admin)" in admin
    assert "2 of 5 committed" in admin and "0.8900" in admin
    assert "Participants of round 2" in admin and "budget exhausted" in admin
    assert "hash chain intact" in admin and "requires" not in admin
    guest = _render(env, "dave")
    assert "0.8900" in guest and "1.000 of budget 3 at δ=1e-05" in guest
    assert "Rounds (requires engineer)" in guest
    assert "Privacy ledger (requires auditor)" in guest
    assert "Audit log (requires auditor)" in guest
    assert "hospital-a" not in guest
    assert len(_audit(env, "operator_denied")) == before  # asked GetAccess, not denied calls
    auditor = _render(env, "carol")
    assert "Rounds (requires engineer)" in auditor and "hospital-b" in auditor


def test_status_json_holds_the_tables_and_the_roles_the_rest_needs(env: Env) -> None:
    from typer.testing import CliRunner

    from fedvault.app.cli import app

    def status(operator: str) -> dict[str, object]:
        kit = str(env.prov.operator_kits[operator])
        done = CliRunner().invoke(app, ["status", "--kit", kit, "--job", "study", "--json"])
        assert done.exit_code == 0, done.output
        return dict(json.loads(done.stdout))  # stdout holds the JSON document alone

    admin = status("alice")
    assert admin["operator"] == {"common_name": "alice", "role": "admin", "address": env.address}
    assert admin["requires"] == {}
    job = admin["job"]
    assert isinstance(job, dict) and job["job"] == "study" and job["rounds_committed"] == 2
    rounds = admin["rounds"]
    assert isinstance(rounds, list) and [r["round"] for r in rounds] == [1, 2]
    participants = admin["participants"]
    assert isinstance(participants, dict) and participants["round"] == 2
    assert any("budget exhausted" in p["reason"] for p in participants["participants"])
    audit = admin["audit_log"]
    assert isinstance(audit, dict) and audit["chain_intact"] is True
    assert all(isinstance(e["detail"], dict) for e in audit["events"])  # parsed, not text
    guest = status("dave")
    assert guest["rounds"] is None and guest["audit_log"] is None
    assert guest["requires"] == {
        "rounds": "engineer",
        "privacy_ledger": "auditor",
        "audit_log": "auditor",
    }


# -- the coordinator service's job queue --------------------------------------------------

JOB_TOML = '[job]\nname = "{name}"\ntask = "breast-cancer"\nhospitals = {n}\nrounds = {rounds}\n'


def _job_toml(name: str, *, n: int = 2, rounds: int = 2) -> str:
    return JOB_TOML.format(name=name, n=n, rounds=rounds)


@dataclass(frozen=True)
class Queue:
    env: Env
    address: str
    store_url: str
    woken: threading.Event

    def client(self, operator: str) -> OperatorClient:
        kit = Kit.load(self.env.prov.operator_kits[operator])
        return OperatorClient(kit, address=self.address, timeout=5)


@pytest.fixture
def queue(env: Env, tmp_path: Path) -> Iterator[Queue]:
    """An operator API with a job queue, as `fedvault coordinator start` serves it."""
    kit = Kit.load(env.prov.coordinator_kit)
    woken = threading.Event()

    def validate(text: str) -> tuple[str, Mapping[str, object]]:
        job = parse_job(text, kit, source="the submitted job")
        return job.job, job.to_dict()

    url = sqlite_url(tmp_path / "queue.sqlite")
    address = f"127.0.0.1:{_free_port()}"
    server = serve(url, kit, address=address, intake=JobIntake(validate, woken.set))
    yield Queue(env, address, url, woken)
    server.stop(None).wait(5)


def test_jobs_are_submitted_listed_stopped_and_queued_again(queue: Queue) -> None:
    with queue.client("bob") as engineer:
        first = engineer.submit_job(_job_toml("first"), reason="baseline")
        assert (first.job, first.status, first.queue_position) == ("first", "queued", 1)
        assert queue.woken.is_set()
        second = engineer.submit_job(_job_toml("second", rounds=3))
        assert (second.queue_position, second.rounds_planned, second.task) == (
            2,
            3,
            "breast-cancer",
        )
        with pytest.raises(OperatorApiError, match="consortium enrols 3"):
            engineer.submit_job(_job_toml("big", n=4))
        with pytest.raises(OperatorApiError, match="unknown task 'nope'"):
            engineer.submit_job(_job_toml("x").replace("breast-cancer", "nope"))
        with pytest.raises(OperatorApiError, match="not valid TOML"):
            engineer.submit_job("[job")
        with pytest.raises(OperatorApiError, match="already exists with other settings"):
            engineer.submit_job(_job_toml("first", rounds=9))
        with pytest.raises(OperatorApiError, match="already queued"):
            engineer.submit_job(_job_toml("first"))
        assert engineer.stop_job("first", reason="wait").status == "stopped"
        listed = {j.job: j for j in engineer.list_jobs().jobs}
        assert [(j.status, j.queue_position) for j in listed.values()] == [
            ("stopped", 0),
            ("queued", 1),
        ]
        resumed = engineer.resume_job("first")
        assert resumed.status == "queued"
        jobs = engineer.list_jobs().jobs
        assert [(j.job, j.queue_position) for j in jobs] == [("first", 2), ("second", 1)]
        assert jobs[0].created_at <= jobs[1].created_at <= jobs[0].updated_at
    with queue.client("dave") as guest, pytest.raises(OperatorPermissionError) as denied:
        guest.submit_job(_job_toml("guest-job"))
    assert denied.value.required_role is Role.ENGINEER
    with queue.client("carol") as auditor, pytest.raises(OperatorPermissionError):
        auditor.submit_job(_job_toml("auditor-job"))
    with RoundStore(queue.store_url) as store:
        assert store.get_job("guest-job") is None
        actions = [
            (e.actor, e.detail["method"])
            for e in store.audit_events()
            if e.kind == "operator_action"
        ]
    assert actions == [
        ("bob", "SubmitJob"),
        ("bob", "SubmitJob"),
        ("bob", "StopJob"),
        ("bob", "ResumeJob"),
    ]


def test_job_list_shows_each_hospitals_epsilon_across_jobs_to_auditors(queue: Queue) -> None:
    with RoundStore(queue.store_url) as store:
        for name, rounds in (("a", 2), ("b", 1)):
            job = store.open_job(name, {"rounds": 2})
            for number in range(1, rounds + 1):
                store.commit_round(job.id, _commit(number))
            store.set_job_status(job.id, "finished")
    with queue.client("carol") as auditor:
        listed = auditor.list_jobs()
    assert listed.epsilon_visible
    assert [(j.job, j.status, j.rounds_committed) for j in listed.jobs] == [
        ("a", "finished", 2),
        ("b", "finished", 1),
    ]
    spend = {e.hospital: e for e in listed.epsilon}
    assert set(spend) == set(HOSPITALS)
    for h in HOSPITALS:
        assert spend[h].per_job == {
            "a": pytest.approx(_epsilon(h, 2)),
            "b": pytest.approx(_epsilon(h, 1)),
        }
        assert spend[h].total == pytest.approx(_epsilon(h, 2) + _epsilon(h, 1))
        assert spend[h].delta_total == pytest.approx(2e-5)
    with queue.client("dave") as guest:
        hidden = guest.list_jobs()
    assert not hidden.epsilon_visible and hidden.epsilon == ()
    assert [j.job for j in hidden.jobs] == ["a", "b"]
    console = Console(record=True, width=200, force_terminal=False)
    render_jobs(listed, console)
    text = console.export_text()
    assert f"{_epsilon('hospital-a', 2) + _epsilon('hospital-a', 1):.4f}" in text
    assert jobs_json(hidden)["epsilon"] is None
