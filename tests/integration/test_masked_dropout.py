"""A masked round on real processes survives a hospital killed after masking, exactly.

Five hospital daemons and a coordinator daemon (TLS on 127.0.0.1; job ``rounds = 1``,
``min_hospitals = 3``, masking on by default). Five hospitals, because under the
default parameters (complete graph, ``colluders = 1``) five is the smallest
consortium that tolerates a dropout after masking: ``k = 4``, ``T = 3``
(docs/secagg.md). hospital-5 trains, masks, keeps its reply and session, and is
SIGKILLed (every process of it) before its reply leaves. The round must commit
with the other four, and its aggregate decrypt to exactly what the same four
updates give without masking.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedvault.app.demo import JOB_NAME, prepare_consortium
from fedvault.app.operator_client import OperatorApiError, OperatorClient
from fedvault.client.keys import KeyStore
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url
from fedvault.flower_env import spawn, terminate_tree
from fedvault.kit import Kit
from fedvault.npz import arrays_from_bytes
from fedvault.privacy.he import Aggregator, decrypt_average, encrypt_update, parse_envelope

pytestmark = pytest.mark.e2e

NAMES = tuple(f"hospital-{i}" for i in range(1, 6))
VICTIM = "hospital-5"
ROUND_TIMEOUT_S = int(os.environ.get("FEDVAULT_TEST_ROUND_TIMEOUT_S", "45"))
TIMEOUT_S = 300 + 4 * ROUND_TIMEOUT_S

#: Test-only ``sitecustomize`` (as in test_client_faults.py), active only in the
#: ClientApp of the hospital with ``$FEDVAULT_TEST_FAULT``: once its round-1 reply was
#: masked, booked and kept, before it leaves, it marks ``hold-1`` and waits to be killed.
#: In every hospital it copies the kept unmasked updates to ``$FEDVAULT_TEST_KEEP_DIR``
#: before the hospital purges them (the test rebuilds the unmasked sum from them).
HOLD_HOOK = """\
import os
import shutil
import sys
import time

_clientapp = any(a.endswith("flwr-clientapp") for a in getattr(sys, "orig_argv", ()))
if _clientapp and os.environ.get("FEDVAULT_TEST_KEEP_DIR"):
    from pathlib import Path

    from fedvault.client import masking

    _purge = masking.purge_committed

    def _copying_purge(state_dir, job, **kw):
        keep = Path(os.environ["FEDVAULT_TEST_KEEP_DIR"]) / Path(state_dir).name
        keep.mkdir(parents=True, exist_ok=True)
        for update in Path(state_dir, "secagg", job).glob("round-*/update.npz"):
            shutil.copy(update, keep / (update.parent.name + ".npz"))
        return _purge(state_dir, job, **kw)

    masking.purge_committed = _copying_purge

if os.environ.get("FEDVAULT_TEST_FAULT") and _clientapp:
    from fedvault.client.sent import SentUpdates

    _put = SentUpdates.put

    def _held_put(self, instr, reply):
        _put(self, instr, reply)
        mark = os.path.join(os.environ["FEDVAULT_TEST_FAULT_DIR"], "hold-1")
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
        while True:
            time.sleep(0.2)

    SentUpdates.put = _held_put
"""


def _until(predicate: Callable[[], bool], timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {p.name} ---\n{p.read_text(errors='replace')[-2000:]}"
                for p in sorted(logs.rglob("*.log"))
            )
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(0.25)


def test_a_hospital_killed_after_masking_leaves_the_exact_aggregate(
    tmp_path: Path, processes_mentioning: Callable[[Path], dict[int, str]]
) -> None:
    paths = prepare_consortium(tmp_path, hospitals=len(NAMES), rounds=1, epsilon=3.0)
    with paths["job"].open("a") as f:
        f.write(f"min_hospitals = 3\nround_timeout_s = {ROUND_TIMEOUT_S}\n")
    hook, logs, fault = tmp_path / "hook", tmp_path / "logs", tmp_path / "fault"
    copies = tmp_path / "unmasked-copies"
    for d in (hook, logs, fault, copies):
        d.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_HOOK)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH", "")) if p)
    env["FEDVAULT_TEST_KEEP_DIR"] = str(copies)
    store_url = sqlite_url(paths["state"] / DEFAULT_STORE_FILENAME)
    state = {n: tmp_path / "hospital-state" / n for n in NAMES}
    operator = Kit.load(paths["kits"] / "operators" / "operator")
    procs = {}

    def control(action: str) -> bool:
        try:
            with OperatorClient(operator) as client:
                call = client.pause_job if action == "pause" else client.resume_job
                call(JOB_NAME, reason="waiting for every hospital")
        except OperatorApiError:
            return False
        return True

    def enrolled() -> bool:
        with contextlib.suppress(Exception), RoundStore(store_url) as store:
            return sum(e.kind == "node_enrolled" for e in store.audit_events()) >= len(NAMES)
        return False

    def online(name: str) -> bool:
        log = state[name] / "supernode" / "supernode.log"
        return log.exists() and b"SuperNode ID:" in log.read_bytes()

    try:
        procs["coordinator"] = spawn(
            [sys.executable, "-m", "fedvault", "coordinator", "start",
             "--kit", str(paths["kits"] / "coordinator"), "--job", str(paths["job"]),
             "--state", str(paths["state"]), "--exit-when-idle"],
            env=env, log_path=logs / "coordinator.log",
        )  # fmt: skip
        _until(enrolled, 120, "the coordinator to enrol the hospitals", logs)
        for name in NAMES:
            extra = {"FEDVAULT_TEST_FAULT": "hold", "FEDVAULT_TEST_FAULT_DIR": str(fault)}
            procs[name] = spawn(
                [sys.executable, "-m", "fedvault", "client", "start",
                 "--kit", str(paths["kits"] / "hospitals" / name),
                 "--data", str(paths["data"] / name / "data.toml"),
                 "--policy", str(paths["data"] / name / "policy.toml"),
                 "--state", str(state[name])],
                env=dict(env, **extra) if name == VICTIM else env,
                log_path=logs / f"{name}.log",
            )  # fmt: skip
        _until(lambda: control("pause"), 60, "the operator API", logs)
        _until(lambda: all(online(n) for n in NAMES), 180, "every hospital online", logs)
        control("resume")
        _until((fault / "hold-1").exists, 4 * ROUND_TIMEOUT_S, f"{VICTIM} to mask", logs)
        victims = set(processes_mentioning(state[VICTIM])) | set(processes_mentioning(fault))
        victims.add(procs[VICTIM].pid)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _until(lambda: procs["coordinator"].poll() is not None, TIMEOUT_S, "the job", logs)
    finally:
        for proc in reversed(list(procs.values())):
            terminate_tree(proc, grace=10.0)
        for pid in processes_mentioning(tmp_path):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    with RoundStore(store_url) as store:
        job = store.get_job(JOB_NAME)
        assert job is not None and job.status == "finished"
        (view,) = store.rounds(job.id)
        model = store.latest_model(job.id)
        events = [e.kind for e in store.audit_events(job.id)]
    assert (view.number, view.status, view.attempt) == (1, "committed", 1)
    statuses = {p.hospital: p.status for p in view.participations}
    assert statuses == {**dict.fromkeys(NAMES, "ok"), VICTIM: "failed"}
    assert "round_unmask_failed" not in events and "unmask_rejected" not in events
    assert model is not None and model.kind == "bfv"

    # Each survivor purged its kept update and sessions once the round was committed;
    # only the record of the one answered unmask context stays.
    for name in NAMES[:-1]:
        left = state[name] / "secagg" / JOB_NAME / "round-1"
        assert sorted(p.name for p in left.iterdir()) == ["answered"], name

    # The same four updates, unmasked: each survivor kept its own before masking it
    # (copied by the hook just before the purge).
    fingerprint = parse_envelope(model.blob).context_fingerprint
    secret = KeyStore(state["hospital-1"]).find(fingerprint)
    public = secret.public()
    env_epoch = parse_envelope(model.blob).key_epoch
    plain = Aggregator(public, key_epoch=env_epoch, job=JOB_NAME, server_round=1)
    samples = {p.hospital: p.samples for p in view.participations}
    for name in NAMES[:-1]:
        update = arrays_from_bytes((copies / name / "round-1.npz").read_bytes())
        plain.add(
            encrypt_update(
                public,
                update,
                weight=float(samples[name]),
                key_epoch=env_epoch,
                job=JOB_NAME,
                server_round=1,
            )
        )
    got, want = decrypt_average(secret, model.blob), decrypt_average(secret, plain.result())
    assert got.keys() == want.keys()
    for key in want:
        assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes(), key
