"""Real Flower 1.41 processes on loopback: SuperLink + Fleet gateway + SuperNodes.

What is proved here, with throwaway certificates and a trivial app:

* a 2-node job over TLS with SuperNode authentication completes, and FedAvg's
  result is the exact sample-weighted mean of what the nodes sent;
* an unregistered node key is refused (``[code: 2004]``), and the supervisor
  restarts it with backoff and says why;
* the open door is closed: a client holding only the public CA certificate,
  dialling the public address, can neither register a node nor start, stop or
  list runs, nor reach the Runtime API; the operator's loopback port can;
* supervisors stop whole process trees (SIGKILL after the grace), no orphans.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedvault.client import supernode as supernode_mod
from fedvault.client.supernode import SuperNodeConfig, SuperNodeSupervisor
from fedvault.client.supernode_entry import CONNECTION_ENDED, CONNECTION_ENDED_TEXT
from fedvault.coordinator.daemon import enrol_nodes
from fedvault.coordinator.store import RoundStore
from fedvault.coordinator.superlink import (
    ControlApiError,
    ControlClient,
    SuperLinkConfig,
    SuperLinkProcess,
)
from fedvault.flower_env import (
    SUPEREXEC_POLL_ENV,
    SUPEREXEC_TASK_POLL_S,
    app_pyproject,
    flower_env,
    free_port,
    group_members,
    reap_group,
    terminate_tree,
)

NODES = ("node1", "node2", "stranger", "late", "direct", "gated", "enrol1", "enrol2")


SERVER_PY = """\
import json
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-rounds"])
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord([np.zeros(3)]), num_rounds=rounds
    )
    with open(str(context.run_config["out-file"]), "w") as f:
        json.dump({"final": result.arrays.to_numpy_ndarrays()[0].tolist()}, f)
"""

# Each node sends value * round with weight `weight`: FedAvg's last round is
# (1.0*1 + 4.0*3) / 4 * 2 = 6.5 for the node configs below.
CLIENT_PY = """\
import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(msg: Message, context: Context) -> Message:
    value = float(context.node_config["value"]) * int(msg.content["config"]["server-round"])
    reply = RecordDict({
        "arrays": ArrayRecord([np.full(3, value)]),
        "metrics": MetricRecord({"num-examples": int(context.node_config["weight"])}),
    })
    return Message(reply, reply_to=msg)
"""


def _make_pki(out: Path) -> dict[str, Path]:
    """CA, server certificate for localhost/127.0.0.1, ECDSA P-384 OpenSSH node keys."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                ca_name if ca else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
            )
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA384())

    server_key = ec.generate_private_key(ec.SECP384R1())
    paths = {"ca": out / "ca.pem", "cert": out / "server.pem", "key": out / "server.key"}
    pem = serialization.Encoding.PEM
    paths["ca"].write_bytes(cert("test CA", ca_key, ca=True).public_bytes(pem))
    paths["cert"].write_bytes(cert("localhost", server_key, ca=False).public_bytes(pem))
    paths["key"].write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    for name in NODES:
        key = ec.generate_private_key(ec.SECP384R1())
        paths[name] = out / name
        paths[name].write_bytes(
            key.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        paths[f"{name}.pub"] = out / f"{name}.pub"
        paths[f"{name}.pub"].write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
        )
    return paths


def _tree(root: int) -> set[int]:
    """Live (non-zombie) descendants of ``root``, from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parent[int(entry)] = int(fields[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _is_superexec(pid: int) -> bool:
    return any(Path(arg).name == "flower-superexec" for arg in _cmdline(pid)[:2])


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


def test_superexec_task_poll_is_fedvaults_unless_the_operator_set_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from flwr.supercore.superexec.run_superexec import _get_task_poll_interval

    env = flower_env(flwr_home=tmp_path, base={})
    assert env[SUPEREXEC_POLL_ENV] == repr(SUPEREXEC_TASK_POLL_S)
    # Flower itself accepts the value (it refuses anything outside 0.01..60 s).
    monkeypatch.setenv(SUPEREXEC_POLL_ENV, env[SUPEREXEC_POLL_ENV])
    assert _get_task_poll_interval() == SUPEREXEC_TASK_POLL_S < 1.0
    assert (
        flower_env(flwr_home=tmp_path, base={SUPEREXEC_POLL_ENV: "2.5"})[SUPEREXEC_POLL_ENV]
        == "2.5"
    )


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("app")
    pyproject = app_pyproject(
        name="fvprocapp",
        description="fedvault process test app",
        serverapp="fvprocapp.server:app",
        clientapp="fvprocapp.client:app",
        config='num-rounds = 2\nout-file = ""',
    )
    (root / "pyproject.toml").write_text(pyproject)
    pkg = root / "fvprocapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(SERVER_PY)
    (pkg / "client.py").write_text(CLIENT_PY)
    return root


@pytest.fixture(scope="module")
def link(
    pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SuperLinkProcess]:
    config = SuperLinkConfig(
        state_dir=tmp_path_factory.mktemp("superlink"),
        ca_certfile=pki["ca"],
        certfile=pki["cert"],
        keyfile=pki["key"],
        fleet_host="127.0.0.1",
        fleet_port=free_port(),
        control_port=free_port(),
        stop_grace=5.0,
    )
    process = SuperLinkProcess(config)
    with process:
        yield process
        pid = process.pid
        assert pid is not None
        tree = _tree(pid)
    assert process.pid is None
    assert _alive(tree | {pid}) == set()


def _node(
    pki: dict[str, Path],
    link: SuperLinkProcess,
    name: str,
    state: Path,
    address: str | None = None,
    **node_config: float,
) -> SuperNodeSupervisor:
    return SuperNodeSupervisor(
        SuperNodeConfig(
            superlink=address or f"127.0.0.1:{link.config.fleet_port}",
            root_certificates=pki["ca"],
            private_key=pki[name],
            state_dir=state / name,
            runtime_port=free_port(),
            node_config=node_config,
            backoff_initial=0.5,
            backoff_max=2.0,
            stop_grace=5.0,
        )
    )


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_two_node_tls_auth_run_completes_with_exact_fedavg(
    link: SuperLinkProcess, pki: dict[str, Path], app_dir: Path, tmp_path: Path
) -> None:
    keys = [pki[f"{n}.pub"] for n in ("node1", "node2")]
    ids = link.control.register_nodes(keys)
    assert set(ids) == set(keys) and len(set(ids.values())) == 2
    statuses = link.control.node_statuses()
    assert all(statuses[node_id] == "registered" for node_id in ids.values() if node_id)
    # A restarted coordinator enrols the same keys again: the same node ids, not an error.
    assert link.control.register_nodes(keys) == ids
    with pytest.raises(ControlApiError, match="not a readable OpenSSH public key"):
        link.control.register_nodes([tmp_path / "missing.pub"])
    out_file = tmp_path / "result.json"
    nodes = [
        _node(pki, link, "node1", tmp_path, value=1.0, weight=1),
        _node(pki, link, "node2", tmp_path, value=4.0, weight=3),
    ]
    for node in nodes:
        node.start()
    try:
        # No need to wait for the nodes: FedAvg waits for min_available_nodes=2.
        started = time.monotonic()
        run_id = link.control.submit_run(app_dir, {"out-file": str(out_file)})
        status = link.control.wait_run(run_id, timeout=90, poll_interval=2.0)
        print(f"2-round run took {time.monotonic() - started:.1f} s")
        assert status.succeeded, status
        with pytest.raises(ControlApiError, match="Run ID not found"):
            link.control.run_status(run_id ^ 1)
        assert json.loads(out_file.read_text())["final"] == pytest.approx([6.5] * 3)
        assert all(node.restarts == 0 for node in nodes)
        trees = {pid: _tree(pid) for node in nodes if (pid := node.pid) is not None}
        assert len(trees) == 2
        # Each SuperNode's SuperExec polls for ClientApp tasks at fedvault's interval.
        for tree in trees.values():
            assert [_environ(p).get(SUPEREXEC_POLL_ENV) for p in tree if _is_superexec(p)] == [
                repr(SUPEREXEC_TASK_POLL_S)
            ]
    finally:
        t_stop = time.monotonic()
        for node in nodes:
            node.stop()
        print(f"stopping 2 SuperNodes took {time.monotonic() - t_stop:.1f} s")
    assert _alive(set(trees).union(*trees.values())) == set()


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_enrolment_is_recorded_once_even_after_a_kill_between_register_and_record(
    link: SuperLinkProcess, pki: dict[str, Path]
) -> None:
    keys = {"hospital-a": pki["enrol1.pub"], "hospital-b": pki["enrol2.pub"]}
    # A coordinator killed after the SuperLink registered hospital-a's key, before the
    # store recorded it: the restarted one must still bind that node to hospital-a.
    early = link.control.register_nodes([keys["hospital-a"]])[keys["hospital-a"]]
    with RoundStore("sqlite://") as store:
        for _ in range(3):  # the crashed start's successor, then two more restarts
            enrol_nodes(link, keys, store)
        rows = [
            (e.detail["hospital"], e.detail["node_id"])
            for e in store.audit_events()
            if e.kind == "node_enrolled"
        ]
        assert store.verify_audit_chain() is None
    ids = link.control.register_nodes(list(keys.values()))
    assert rows == [("hospital-a", early), ("hospital-b", ids[keys["hospital-b"]])]
    assert early != ids[keys["hospital-b"]]
    assert {early, ids[keys["hospital-b"]]} <= set(link.control.node_statuses())


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_unregistered_node_key_is_refused_and_restarted_with_reason(
    link: SuperLinkProcess, pki: dict[str, Path], tmp_path: Path
) -> None:
    before = link.control.node_statuses()
    with _node(pki, link, "stranger", tmp_path) as node:
        _wait_for(lambda: node.restarts >= 1, 40, "the SuperNode to be refused")
    assert node.last_exit_code not in (None, 0)
    assert node.last_exit_reason is not None and "[code: 2004]" in node.last_exit_reason
    log = node.config.log_path.read_text()
    assert "Failed to activate SuperNode" in log
    assert "restart #1 in 0.50 s" in log
    assert link.control.node_statuses() == before  # nothing enrolled itself


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_locked_superlink_database_is_survived_through_the_gateway(
    link: SuperLinkProcess, pki: dict[str, Path], tmp_path: Path
) -> None:
    """The 100-hospital soak's silent SuperNode, reproduced, and both defences.

    Holding the SuperLink's database lock makes it answer Fleet calls with a bare
    500 ("database is locked" in its log), which Flower's SuperNode does not retry:
    its message loop ends, and stock ``flower-supernode`` then idles forever.

    * A node dialling the SuperLink directly shows the second defence: through our
      entry point it exits with CONNECTION_ENDED, the supervisor says why and
      restarts it, and it is online again once the lock is gone.
    * A node dialling the public gateway (as every hospital does) is told 503 and
      retries until the lock is gone: no exit, same session, still online.
    """
    ids = link.control.register_nodes([pki["direct.pub"], pki["gated.pub"]])
    direct_id, gated_id = ids[pki["direct.pub"]], ids[pki["gated.pub"]]
    direct = _node(pki, link, "direct", tmp_path, address=link.config.control_address)
    gated = _node(pki, link, "gated", tmp_path)
    with direct, gated:

        def online(*node_ids: int | None) -> bool:
            statuses = link.control.node_statuses()
            return all(statuses.get(n) == "online" for n in node_ids if n is not None)

        _wait_for(lambda: online(direct_id, gated_id), 60, "both nodes online")
        first = direct.pid, gated.pid
        db = sqlite3.connect(link.config.database, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            _wait_for(lambda: direct.restarts >= 1, 60, "the direct SuperNode to exit")
            exit_code, reason = direct.last_exit_code, direct.last_exit_reason
            time.sleep(8)  # the gated node polls every 3 s: several 503s by now
        finally:
            db.execute("ROLLBACK")
            db.close()
        assert exit_code == CONNECTION_ENDED
        assert reason is not None and reason.startswith(CONNECTION_ENDED_TEXT)
        assert "ERROR :     Server error '500 Internal Server Error'" in reason  # no colour codes
        _wait_for(
            lambda: direct.pid not in (None, first[0]) and online(direct_id, gated_id),
            60,
            "the restarted direct SuperNode to be online",
        )
        assert gated.restarts == 0 and gated.pid == first[1]
        assert "retrying in" in gated.config.log_path.read_text()  # it did see the 503s
    gateway_log = link.gateway_log.read_text()
    assert "told the node to retry" in gateway_log


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_control_api_is_closed_to_holders_of_the_ca_certificate(
    link: SuperLinkProcess, pki: dict[str, Path], app_dir: Path, tmp_path: Path
) -> None:
    public = f"127.0.0.1:{link.config.fleet_port}"
    outsider = ControlClient(address=public, root_certificates=pki["ca"], flwr_home=tmp_path)
    before = link.control.node_statuses()
    with pytest.raises(ControlApiError, match=r"404.*register-node"):
        outsider.register_node(pki["late.pub"])
    with pytest.raises(ControlApiError, match=r"404.*start-run"):
        outsider.submit_run(app_dir, {"out-file": str(tmp_path / "x.json")})
    with pytest.raises(ControlApiError, match=r"404.*stop-run"):
        outsider.stop_run(1)
    # No node was registered (compare ids: an earlier test's node may go offline meanwhile).
    assert link.control.node_statuses().keys() == before.keys()

    # Raw requests: the Runtime API (task queue) and path tricks get 404 too.
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    for path in (
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/control/list-runs?x=/v1/fleet/get-run",
    ):
        conn = http.client.HTTPSConnection("127.0.0.1", link.config.fleet_port, context=ctx)
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        assert conn.getresponse().status == 404, path
        conn.close()
    refusals = link.gateway_log.read_text()
    assert "refused POST '/v1/control/register-node'" in refusals
    assert "refused POST '/v1/runtime/acquire-task'" in refusals

    # The operator's loopback port does serve it: the refusal above is the gateway's.
    assert link.control.register_node(pki["late.pub"]) not in before
    run_id = link.control.submit_run(app_dir, {"out-file": str(tmp_path / "x.json")})
    link.control.stop_run(run_id)
    status = link.control.wait_run(run_id, timeout=30, poll_interval=0.5)
    assert (status.status, status.sub_status) == ("finished", "stopped")
    assert not (tmp_path / "x.json").exists()


def test_backoff_doubles_to_the_cap_and_reports_flower_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "fake-supernode"
    fake.write_text("#!/bin/sh\necho '[code: 2004] Failed to activate SuperNode.'\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(supernode_mod, "supernode_command", lambda: [str(fake)])
    for name in ("ca.pem", "key"):
        (tmp_path / name).write_text("x")
    config = SuperNodeConfig(
        superlink="127.0.0.1:1",
        root_certificates=tmp_path / "ca.pem",
        private_key=tmp_path / "key",
        state_dir=tmp_path / "state",
        backoff_initial=0.05,
        backoff_max=0.2,
    )
    with SuperNodeSupervisor(config) as node:
        _wait_for(lambda: node.restarts >= 5, 10, "five restarts")
    log = config.log_path.read_text()
    delays = [
        float(line.split(" in ")[1].split(" s")[0])
        for line in log.splitlines()
        if "restart #" in line
    ]
    assert delays[:5] == [0.05, 0.1, 0.2, 0.2, 0.2]
    assert node.last_exit_code == 1
    assert node.last_exit_reason is not None and "not registered" in node.last_exit_reason


def test_terminate_tree_kills_term_ignoring_and_detached_descendants(tmp_path: Path) -> None:
    script = "trap '' TERM; setsid sleep 300 & sleep 300 & wait"
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    _wait_for(lambda: len(_tree(proc.pid)) >= 2, 5, "two children")
    tree = _tree(proc.pid)
    started = time.monotonic()
    code = terminate_tree(proc, grace=0.5)
    assert code == -signal.SIGKILL  # SIGTERM was ignored, so the grace ran out
    assert 0.5 <= time.monotonic() - started < 3.0
    assert _alive(tree) == set()


def test_reap_group_stops_what_an_exited_leader_left_behind() -> None:
    # Like a SuperNode that crashes: its SuperExec (here a TERM-ignoring sleep and a
    # plain one) lives on in its process group after the leader exits.
    script = "(trap '' TERM; exec sleep 300) & sleep 300 & exit 3"
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    assert proc.wait(timeout=5) == 3
    _wait_for(lambda: len(group_members(proc.pid)) == 2, 5, "two orphans in the group")
    assert len(reap_group(proc.pid, grace=0.5)) == 2
    assert group_members(proc.pid) == set()
    assert reap_group(proc.pid, grace=0.5) == set()  # nothing left: a no-op


def test_gateway_forwards_exactly_flowers_fleet_routes() -> None:
    from fedvault.coordinator.fleet_gateway import FLEET_PATHS

    assert "/v1/fleet/pull-messages" in FLEET_PATHS
    assert all(p.startswith("/v1/fleet/") for p in FLEET_PATHS)
    assert len(FLEET_PATHS) == 12
