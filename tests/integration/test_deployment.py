"""fedvault as deployed: real daemons, real kits, real TLS, on 127.0.0.1.

What is proved here:

* ``fedvault demo`` runs a 3-hospital consortium (coordinator + 3 hospital
  daemons, each its own process tree) to the end: 2 rounds, accuracy >= 0.85,
  every hospital's ε in (0, 3], a summary table, and no process left behind;
* the coordinator never stored *or received* a HE secret context: every file
  it wrote, every value of its round store, every row of Flower's SuperLink
  database, and every request body its public Fleet gateway relayed (captured
  by a test-only ``sitecustomize`` hook, see :data:`CAPTURE_HOOK`) is searched
  for the secret context's bytes (raw and base64) and parsed as a TenSEAL
  context where possible; the sealed envelopes it relays open only with the
  recipient hospital's kit, and the coordinator kit holds no X25519 key;
* all three hospitals hold the one key pair whose public half the coordinator
  keeps (same fingerprint; a vector encrypted under the coordinator's public
  context decrypts at every hospital);
* a kit with one flipped byte is refused at start (exit 2, one line, no process);
* a hospital trusting another consortium's CA cannot connect (TLS failure), and
  one that trusts the right CA but holds an unenrolled node key is refused
  (``[code: 2004]``); neither ever shows as online.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import tenseal as ts
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from flwr.app import ConfigRecord
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.supercore.inflatable.inflatable_object import get_object_type_from_object_content

from fedvault.app.provision import provision
from fedvault.client.ledger import LedgerEntry, LocalLedger
from fedvault.client.supernode import SuperNodeConfig, SuperNodeSupervisor
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.coordinator.superlink import SuperLinkConfig, SuperLinkProcess
from fedvault.errors import KeyMismatchError
from fedvault.flower_env import free_port
from fedvault.kit import Kit, KitError, KitKind
from fedvault.privacy.he import decrypt_average, encrypt_update
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.sealing import SealedKeyEnvelope

if TYPE_CHECKING:
    from conftest import DemoRun

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "consortium.toml"
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
#: Every test that reads the demo may be the one that pays for the run (~2 min).
DEMO_TEST_TIMEOUT_S = 480
# ---- secret-key detection ----------------------------------------------------------------


@dataclass(frozen=True)
class SecretProbe:
    """Finds a HE secret context in arbitrary bytes, raw or base64-encoded.

    ``needles`` are 64-byte pieces of the secret serialization that do not occur
    in its public serialization (so they come from the secret key itself), plus
    their base64 forms at all three alignments, which any base64 encoding of a
    blob containing the secret must contain.
    """

    secrets: tuple[bytes, ...]
    needles: tuple[bytes, ...]

    @classmethod
    def build(cls, secrets: list[bytes], public: bytes, *, stride: int = 4096) -> SecretProbe:
        needles: list[bytes] = []
        for secret in dict.fromkeys(secrets):
            for off in range(0, len(secret) - 64, stride):
                if secret[off : off + 64] in public:
                    continue
                needles.append(secret[off : off + 64])
                needles += [base64.b64encode(secret[off + r : off + r + 48]) for r in range(3)]
        return cls(tuple(dict.fromkeys(secrets)), tuple(needles))

    def leaks(self, data: bytes) -> bool:
        return any(s in data for s in self.secrets) or any(n in data for n in self.needles)


def _parse_context(data: bytes) -> ts.Context | None:
    """The TenSEAL context ``data`` holds, or None when it is not one."""
    if not data:
        return None
    try:
        return ts.context_from(bytes(data))
    except Exception:  # TenSEAL raises ValueError/RuntimeError/TypeError on non-contexts
        return None


@dataclass
class ScanResult:
    """What a scan saw: items scanned, and which held a (public) context."""

    scanned: int = 0
    contexts: dict[str, ts.Context] = field(default_factory=dict)


def _scan(items: Iterator[tuple[str, bytes]], probe: SecretProbe, result: ScanResult) -> None:
    for name, data in items:
        result.scanned += 1
        assert not probe.leaks(data), f"HE secret key material found in {name}"
        ctx = _parse_context(data)
        if ctx is not None:
            assert not ctx.is_private(), f"{name} is a HE context WITH the secret key"
            result.contexts[name] = ctx


def _files(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            yield str(path), path.read_bytes()


def _sqlite_cells(db: Path, workdir: Path) -> Iterator[tuple[str, bytes]]:
    """Every TEXT/BLOB value of every table (read from a copy, WAL included)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        src = db.with_name(db.name + suffix)
        if src.exists():
            shutil.copy2(src, workdir / src.name)
    con = sqlite3.connect(workdir / db.name)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for rowid, row in enumerate(con.execute(f'SELECT * FROM "{table}"')):
                for i, value in enumerate(row):
                    if isinstance(value, bytes):
                        yield f"{db.name}:{table}[{rowid}].{i}", value
                    elif isinstance(value, str):
                        yield f"{db.name}:{table}[{rowid}].{i}", value.encode()
    finally:
        con.close()


def _relayed_values(capture: Path) -> Iterator[tuple[str, bytes]]:
    """Captured request bodies, plus every bytes value of every ConfigRecord pushed.

    Flower 1.41 ships message content as inflatable objects (``push-object``);
    a ConfigRecord's bytes values (where the key ceremony puts contexts and
    envelopes) are unpacked so each can be parsed as a context on its own.
    """
    for path in sorted(capture.glob("*.bin")):
        body = path.read_bytes()
        yield path.name, body
        if not path.name.endswith("fleet-push-object.bin"):
            continue
        content = PushObjectRequest.FromString(body).object_content
        if get_object_type_from_object_content(content) != "ConfigRecord":
            continue
        for key, value in ConfigRecord.inflate(content).items():
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, bytes):
                    yield f"{path.name}:ConfigRecord[{key}][{i}]", v


@pytest.fixture(scope="module")
def secrets(demo: DemoRun) -> dict[str, bytes]:
    """Each hospital's secret context file (checked to be a private context)."""
    if demo.returncode != 0:
        pytest.fail(f"the demo failed, nothing to inspect: {demo.explain()}")
    out = {}
    for name in HOSPITALS:
        path = demo.out / "hospital-state" / name / "keys" / "epoch-1" / "he-secret.ctx"
        out[name] = path.read_bytes()
        assert ts.context_from(out[name]).is_private(), f"{path} holds no secret key"
    return out


@pytest.fixture(scope="module")
def probe(demo: DemoRun, secrets: dict[str, bytes]) -> SecretProbe:
    public = (demo.out / "coordinator" / "keys" / "epoch-1" / "public.ctx").read_bytes()
    built = SecretProbe.build(list(secrets.values()), public)
    assert len(built.needles) >= 40  # the secret key is ~1/3 of the serialization
    return built


# ---- 1. a full run ---------------------------------------------------------------------------


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_demo_runs_three_hospitals_to_the_end_and_stops_every_process(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.explain()
    report = json.loads((demo.out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["final"]["status"] == "finished"
    assert report["final"]["rounds_completed"] == 2
    assert report["final"]["accuracy"] >= 0.85
    assert sorted(report["hospitals"]) == list(HOSPITALS)
    for name, h in report["hospitals"].items():
        assert 0.0 < h["epsilon"] <= 3.0, (name, h)
        assert h["accountant"] == "prv" and h["steps"] > 0 and h["noise_multiplier"] > 0
    for r in report["rounds"]:
        assert sorted(r["participants"]) == list(HOSPITALS)
        assert all(0.0 < e <= 3.0 for e in r["epsilon"].values()), r["epsilon"]
    for name in HOSPITALS:  # ε accumulates: round 2 spends on top of round 1
        assert report["rounds"][0]["epsilon"][name] < report["rounds"][1]["epsilon"][name]
    assert report["final"]["epsilon_max"] == pytest.approx(
        max(h["epsilon"] for h in report["hospitals"].values())
    )
    for title in ("Rounds", "Hospitals (privacy spent in this job)", "final accuracy"):
        assert title in demo.stdout, demo.stdout
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"│\s+(hospital-\d)\s+│\s+(\d+)\s+│", demo.stdout)
    }
    assert rows == {n: str(report["hospitals"][n]["samples"]) for n in HOSPITALS}
    assert re.search(r"│\s+2\s+│\s+0\.\d{4}\s+│", demo.stdout), demo.stdout  # round 2 row
    assert "status finished" in demo.stdout
    assert "all 4 daemons stopped" in demo.stdout
    assert demo.left_after_settle == {}, f"processes left behind: {demo.left_after_settle}"
    assert demo.left_at_exit == {}, f"still running when the demo exited: {demo.left_at_exit}"


def _daemon_log_problems(logs: Path, rounds: int) -> list[str]:
    """What is wrong with the demo's daemon logs: plain lines, one per round event."""
    problems = []
    coordinator = (logs / "coordinator.log").read_text()
    for name in ("coordinator", *HOSPITALS):
        text = (logs / f"{name}.log").read_text()
        if "\x1b" in text:
            problems.append(f"{name}.log has terminal escapes")
    if "httpx" in coordinator:
        problems.append("coordinator.log has the 3-second status poll at INFO")
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ INFO fedvault\.coordinator job=\S+"
    for n in range(1, rounds + 1):
        committed = rf"{stamp} round={n} committed: {len(HOSPITALS)} participants in \d+\.\d s$"
        for event, pattern in (("started", rf"{stamp} round={n} started$"), ("commit", committed)):
            if len(re.findall(pattern, coordinator, re.MULTILINE)) != 1:
                problems.append(f"coordinator.log: not one {event} line for round {n}")
    return problems


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_daemon_logs_are_plain_lines_with_one_line_per_round_event(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.explain()
    problems = _daemon_log_problems(demo.out / "logs", rounds=2)
    assert not problems, (problems, (demo.out / "logs" / "coordinator.log").read_text()[-4000:])


# ---- 2. the coordinator never holds the secret key ------------------------------------------


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_secret_probe_finds_the_key_embedded_raw_or_in_base64(
    demo: DemoRun, probe: SecretProbe, secrets: dict[str, bytes]
) -> None:
    pieces_only = SecretProbe((), probe.needles)  # without the whole-file match
    secret = secrets["hospital-1"]
    assert pieces_only.leaks(b"\x00" * 7 + secret + b"tail")
    for pad in range(3):  # base64 at every alignment, inside JSON
        blob = b"x" * pad + secret
        assert pieces_only.leaks(json.dumps({"k": base64.b64encode(blob).decode()}).encode())
    public = (demo.out / "coordinator" / "keys" / "epoch-1" / "public.ctx").read_bytes()
    assert not pieces_only.leaks(public)
    assert not pieces_only.leaks(base64.b64encode(public))


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_coordinator_never_stored_a_secret_context(
    demo: DemoRun, probe: SecretProbe, tmp_path: Path
) -> None:
    coordinator = demo.out / "coordinator"
    files = ScanResult()
    _scan(_files(coordinator), probe, files)
    _scan(_files(demo.out / "kits" / "coordinator"), probe, files)
    _scan(
        iter([("logs/coordinator.log", (demo.out / "logs" / "coordinator.log").read_bytes())]),
        probe,
        files,
    )
    assert files.scanned >= 12
    # The check can see contexts: the public one it keeps is found (and is public).
    assert str(coordinator / "keys" / "epoch-1" / "public.ctx") in files.contexts

    store = ScanResult()
    with RoundStore(sqlite_url(coordinator / "fedvault.sqlite")) as rs:
        _scan(rs.iter_blobs(), probe, store)
    assert store.scanned >= 20

    link_db = ScanResult()
    _scan(
        _sqlite_cells(coordinator / "superlink" / "superlink.db", tmp_path / "db"), probe, link_db
    )
    assert link_db.scanned >= 5  # nodes, run, fab ...; relayed messages are deleted on delivery
    print(
        f"scanned {files.scanned} files, {store.scanned} store values, "
        f"{link_db.scanned} SuperLink cells"
    )


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_coordinator_never_received_a_secret_context(
    demo: DemoRun, probe: SecretProbe, secrets: dict[str, bytes]
) -> None:
    relayed = ScanResult()
    _scan(_relayed_values(demo.capture), probe, relayed)
    names = [p.name for p in demo.capture.glob("*.bin")]
    assert sum(n.endswith("fleet-push-object.bin") for n in names) >= 10, "capture hook inactive"
    assert any(n.endswith("fleet-push-messages.bin") for n in names)
    # Positive control: the custodian's public context went through the relay and was seen.
    public = HeContext.from_bytes(secrets["hospital-1"]).fingerprint
    seen = [HeContext.from_bytes(ctx.serialize()).fingerprint for ctx in relayed.contexts.values()]
    assert public in seen
    # ... and so did the envelopes the coordinator stored (it relays what it receives).
    stored = (
        demo.out / "coordinator" / "keys" / "epoch-1" / "sealed" / "hospital-2.env"
    ).read_bytes()
    assert any(stored in p.read_bytes() for p in demo.capture.glob("*.bin"))
    print(f"relay: {len(names)} request bodies, {relayed.scanned} values scanned")


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_sealed_envelopes_open_only_with_the_recipient_kit(
    demo: DemoRun, secrets: dict[str, bytes]
) -> None:
    kits = demo.out / "kits"
    coordinator_kit = Kit.load(kits / "coordinator", expected_kind=KitKind.COORDINATOR)
    with pytest.raises(KitError, match=r"has no seal\.key"):
        coordinator_kit.seal_private_key()
    private_keys: dict[str, object] = {}
    for path in sorted((kits / "coordinator").rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        for load in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
            try:
                private_keys[path.name] = load(data, None)
            except Exception:  # not a key in this format
                continue
    assert list(private_keys) == ["coordinator.key"]
    assert isinstance(private_keys["coordinator.key"], ec.EllipticCurvePrivateKey)

    sealed = sorted((demo.out / "coordinator" / "keys" / "epoch-1" / "sealed").glob("*.env"))
    assert [p.stem for p in sealed] == ["hospital-2", "hospital-3"]
    fingerprint = HeContext.from_bytes(secrets["hospital-1"]).fingerprint
    for path in sealed:
        envelope = SealedKeyEnvelope.from_bytes(path.read_bytes())
        assert (envelope.recipient, envelope.sender, envelope.epoch) == (path.stem, "hospital-1", 1)
        with pytest.raises(KeyMismatchError):
            envelope.open(x25519.X25519PrivateKey.generate(), expected_epoch=1)
        other = "hospital-3" if path.stem == "hospital-2" else "hospital-2"
        with pytest.raises(KeyMismatchError):
            envelope.open(Kit.load(kits / "hospitals" / other).seal_private_key(), expected_epoch=1)
        # It does hold the key: the recipient's own kit opens it.
        opened = HeContext.from_bytes(
            envelope.open(
                Kit.load(kits / "hospitals" / path.stem).seal_private_key(), expected_epoch=1
            )
        )
        assert opened.is_private and opened.fingerprint == fingerprint


# ---- 3. one key pair across the consortium -----------------------------------------------


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_every_hospital_holds_the_key_of_the_coordinators_public_context(
    demo: DemoRun, secrets: dict[str, bytes]
) -> None:
    public_bytes = (demo.out / "coordinator" / "keys" / "epoch-1" / "public.ctx").read_bytes()
    public = HeContext.from_bytes(public_bytes)
    assert not public.is_private
    contexts = {name: HeContext.from_bytes(data) for name, data in secrets.items()}
    assert {name: c.fingerprint for name, c in contexts.items()} == dict.fromkeys(
        HOSPITALS, public.fingerprint
    )
    values = np.linspace(-3.0, 3.0, 257)
    cipher = encrypt_update(public, {"v": values}, weight=1.0)
    for name, ctx in contexts.items():
        assert ctx.is_private, name
        decrypted = decrypt_average(ctx, cipher)["v"]
        np.testing.assert_allclose(decrypted, values, atol=2.0**-17, err_msg=name)


# ---- 4. tampered kits ---------------------------------------------------------------------


def _flip_byte(path: Path, offset: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    mode = path.stat().st_mode
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    path.chmod(mode & 0o777)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tampered")
    toml = root / "consortium.toml"
    shutil.copy(EXAMPLE, toml)
    provision(toml, root / "kits")
    return root


def _start_refused(
    argv: list[str], left_behind: Callable[[], dict[int, str]]
) -> subprocess.CompletedProcess[str]:
    """Run a daemon command that must be refused at once: exit 2, one line, nothing left."""
    done = subprocess.run(
        [sys.executable, "-m", "fedvault", *argv],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "failed verification" in lines[0], lines[0]
    assert left_behind() == {}
    return done


@pytest.mark.timeout(120)
def test_client_start_refuses_a_tampered_hospital_kit(
    consortium: Path, processes_mentioning: Callable[[Path], dict[int, str]]
) -> None:
    kit = consortium / "kits" / "hospitals" / "hospital-a"
    work = consortium / "hospital-a"
    spec = work / "data.toml"
    spec.parent.mkdir()
    spec.write_text('format = "csv"\ntrain = "train.csv"\nlabel = "label"\n')  # never read
    _flip_byte(kit / "node.pub")
    done = _start_refused(
        ["client", "start", "--kit", str(kit), "--data", str(spec), "--state", str(work / "state")],
        lambda: processes_mentioning(consortium),
    )
    assert "node.pub was modified" in done.stderr
    assert not (work / "state").exists()


@pytest.mark.timeout(120)
def test_coordinator_start_refuses_a_tampered_coordinator_kit(
    consortium: Path, processes_mentioning: Callable[[Path], dict[int, str]]
) -> None:
    kit = consortium / "kits" / "coordinator"
    manifest = kit / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"127.0.0.1:9092"', '"127.0.0.1:9099"', 1))
    job = consortium / "job.toml"
    job.write_text('[job]\nname = "t"\nexample = "breast-cancer"\nhospitals = 3\nrounds = 1\n')
    state = consortium / "coordinator-state"
    done = _start_refused(
        ["coordinator", "start", "--kit", str(kit), "--job", str(job), "--state", str(state)],
        lambda: processes_mentioning(consortium),
    )
    assert "manifest.json was modified" in done.stderr
    assert not state.exists()


# ---- 5. the wrong CA and an unenrolled key ---------------------------------------------------


def _provision_consortium(root: Path, name: str) -> Path:
    toml = root / f"{name}.toml"
    toml.write_text(
        f'[consortium]\nname = "{name}"\ncoordinator = "127.0.0.1:{free_port()}"\n'
        f'operator_api = "127.0.0.1:{free_port()}"\ncustodian = "{name}-h1"\n'
        f'\n[[hospitals]]\nname = "{name}-h1"\n\n[[hospitals]]\nname = "{name}-h2"\n'
    )
    provision(toml, root / name)
    return root / name


@pytest.mark.timeout(150)
def test_hospitals_of_another_ca_or_with_unenrolled_keys_cannot_connect(
    tmp_path: Path,
    processes_mentioning: Callable[[Path], dict[int, str]],
    wait_for: Callable[[Callable[[], bool], float], bool],
) -> None:
    kits_a = _provision_consortium(tmp_path, "alpha")
    kits_b = _provision_consortium(tmp_path, "beta")
    coord = Kit.load(kits_a / "coordinator", expected_kind=KitKind.COORDINATOR)
    config = SuperLinkConfig.for_kit(coord, tmp_path / "superlink", stop_grace=5.0)
    b_kit = Kit.load(kits_b / "hospitals" / "beta-h1", expected_kind=KitKind.HOSPITAL)

    def node(name: str, root_ca: Path) -> SuperNodeSupervisor:
        return SuperNodeSupervisor(
            SuperNodeConfig(
                superlink=coord.coordinator_address,
                root_certificates=root_ca,
                private_key=b_kit.node_key_path,
                state_dir=tmp_path / name,
                runtime_port=free_port(),
                backoff_initial=0.5,
                backoff_max=2.0,
                stop_grace=5.0,
            )
        )

    with SuperLinkProcess(config) as link:
        enrolled = {link.control.register_node(p) for p in coord.node_public_key_paths().values()}
        assert len(enrolled) == 2
        wrong_ca, unenrolled = node("wrong-ca", b_kit.ca_path), node("unenrolled", coord.ca_path)
        with wrong_ca, unenrolled:
            seen = wait_for(lambda: wrong_ca.restarts >= 1 and unenrolled.restarts >= 1, 40.0)
            statuses = link.control.node_statuses()
        print(f"wrong-CA log tail:\n{_read(wrong_ca.config.log_path)[-1500:]}")
        assert seen, (
            _read(wrong_ca.config.log_path)[-3000:],
            _read(unenrolled.config.log_path)[-3000:],
        )
        assert set(statuses) == enrolled, statuses  # neither enrolled itself
        assert "online" not in statuses.values(), statuses
        assert (
            unenrolled.last_exit_reason is not None
            and "[code: 2004]" in unenrolled.last_exit_reason
        )
        assert "[code: 2004]" in _read(unenrolled.config.log_path)
        # Flower's exit code 305: the SuperLink's certificate did not verify against beta's CA.
        assert "does not verify against this kit's CA" in wrong_ca.last_exit_reason, (
            wrong_ca.last_exit_reason
        )
        assert "[SSL: CERTIFICATE_VERIFY_FAILED]" in _read(wrong_ca.config.log_path)
        assert "Failed to activate SuperNode" not in _read(wrong_ca.config.log_path)
    assert processes_mentioning(tmp_path) == {}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ---- 5. Prometheus metrics, scraped while the demo ran ------------------------------------

MetricSamples = dict[tuple[str, frozenset[tuple[str, str]]], float]
DEMO_JOB = "demo-breast-cancer"


def _samples(text: str) -> MetricSamples:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: MetricSamples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _model_values(store: RoundStore, job_id: int) -> set[float]:
    """Every number the store derived from model values (losses, accuracies, metrics).

    Whole numbers are left out: a perfect accuracy (1.0) is also a count or a round.
    """
    values: set[float | None] = set()
    for view in store.rounds(job_id):
        values |= {view.train_loss, view.eval_accuracy, view.eval_loss}
        values |= set(view.eval_metrics.values())
        values |= {p.train_loss for p in view.participations}
        for e in view.evaluations:
            values |= {e.accuracy, e.loss, *e.metrics.values()}
    return {float(v) for v in values if v is not None and not float(v).is_integer()}


def _check_coordinator_scrape(
    s: MetricSamples, store: RoundStore, job_id: int, model_values: set[float]
) -> int:
    """Check one coordinator scrape against the store; returns its committed round."""
    c = "fedvault_coordinator_"
    j = {"fl_job": DEMO_JOB}
    committed = int(_value(s, c + "committed_rounds", **j) or 0)
    rounds = {v.number: v for v in store.rounds(job_id) if v.status == "committed"}
    assert committed <= len(rounds)
    assert committed <= (_value(s, c + "current_round", **j) or 0) <= len(rounds)
    assert _value(s, c + "planned_rounds", **j) == 2
    assert _value(s, c + "hospitals_enrolled") == len(HOSPITALS)
    ledger = {(row.round, row.hospital): row.epsilon for row in store.ledger(job_id)}
    for name in HOSPITALS:
        h = {**j, "hospital": name}
        assert _value(s, c + "epsilon_budget", **h) == 3.0
        spent = _value(s, c + "epsilon_spent", **h)
        assert spent == (ledger[committed, name] if committed else None), (name, committed)
        last = _value(s, c + "hospital_last_round", **h)
        assert last == committed, (name, last)  # every hospital took part in every round
        oks = _value(s, c + "participations_total", **h, status="ok") or 0
        assert oks == committed
    if committed:
        assert _value(s, c + "round_participants", **j) == rounds[committed].num_participants == 3
        stamp = rounds[committed].committed_at
        assert stamp is not None
        assert _value(s, c + "last_commit_timestamp_seconds", **j) == stamp.timestamp()
    views = store.rounds(job_id)
    # Bytes of every attempt up to this round, plus any failed attempt at the next one.
    low = sum(p.bytes_received for v in views if v.number <= committed for p in v.participations)
    high = low + sum(
        p.bytes_received for v in views if v.number == committed + 1 and v.status == "failed"
        for p in v.participations
    )  # fmt: skip
    received = sum(_value(s, c + "received_bytes_total", **j, hospital=h) or 0 for h in HOSPITALS)
    assert low <= received <= high
    durations = _value(s, c + "round_duration_seconds_count", **j) or 0
    assert committed - 1 <= durations <= committed  # observed just after each commit
    assert not [k for k in s if k[0].startswith(c + "rejected_updates")]
    assert not [k for k in s if "loss" in k[0] or "accuracy" in k[0]], sorted(k[0] for k in s)
    assert not model_values & set(s.values())
    return committed


def _check_hospital_scrape(s: MetricSamples, name: str, entries: list[LedgerEntry]) -> int:
    """Check one hospital scrape against its ledger; returns the rounds it had trained."""
    p = "fedvault_hospital_"
    devices = [k for k in s if k[0] == p + "device_info"]
    assert len(devices) == 1 and s[devices[0]] == 1, devices
    trained = int(_value(s, p + "rounds_trained_total", fl_job=DEMO_JOB) or 0)
    assert trained <= len(entries)
    if trained:
        spent = _value(s, p + "epsilon_spent", fl_job=DEMO_JOB)
        assert spent == entries[trained - 1].epsilon, (name, trained)
        assert _value(s, p + "epsilon_budget", fl_job=DEMO_JOB) == 3.0
        remaining = _value(s, p + "epsilon_remaining", fl_job=DEMO_JOB)
        assert remaining == pytest.approx(3.0 - entries[trained - 1].epsilon, rel=1e-9)
    # Each round: decrypt, train, record on the ledger, encrypt; a scrape may fall in between.
    trainings = _value(s, p + "training_seconds_count") or 0
    encryptions = _value(s, p + "encryption_seconds_count") or 0
    assert trained <= trainings <= trained + 1, (name, trained, trainings)
    assert trained - 1 <= encryptions <= trained, (name, trained, encryptions)
    assert (_value(s, p + "decryption_seconds_count") or 0) >= trainings
    assert not [k for k in s if "loss" in k[0] or "accuracy" in k[0]]
    return trained


@pytest.mark.timeout(DEMO_TEST_TIMEOUT_S)
def test_metrics_scraped_during_the_demo_match_the_store_and_ledgers(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.explain()
    assert sorted(demo.metrics_urls) == ["coordinator", *HOSPITALS], demo.stdout
    for name, url in demo.metrics_urls.items():
        assert f"metrics: {name} {url}" in demo.stdout
    with RoundStore(sqlite_url(demo.out / "coordinator" / DEFAULT_STORE_FILENAME)) as store:
        job = store.get_job(DEMO_JOB)
        assert job is not None and job.status == "finished"
        model_values = _model_values(store, job.id)
        assert model_values  # the check below is not vacuous
        seen = [
            _check_coordinator_scrape(_samples(text), store, job.id, model_values)
            for text in demo.scrapes.get("coordinator", [])
        ]
    assert len(seen) >= 3 and max(seen) >= 1, seen  # scraped a few times, once after a commit
    # The ServerApp's timings crossed from Flower's flwr-serverapp process to the daemon.
    last = _samples(demo.scrapes["coordinator"][-1])
    for timing in ("round_duration_seconds_count", "store_commit_seconds_count"):
        assert (_value(last, f"fedvault_coordinator_{timing}", fl_job=DEMO_JOB) or 0) >= 1, timing
    for name in HOSPITALS:
        ledger_path = demo.out / "hospital-state" / name / "ledger.sqlite"
        with LocalLedger(ledger_path, hospital=name) as ledger:
            entries: list[LedgerEntry] = ledger.entries(DEMO_JOB)
        assert len(entries) == 2
        trained = [_check_hospital_scrape(_samples(t), name, entries) for t in demo.scrapes[name]]
        assert len(trained) >= 3 and max(trained) >= 1, (name, trained)
