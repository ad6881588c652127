"""``fedvault simulate --ray-address``: a job on a real two-node Ray cluster on loopback.

The test starts its own cluster (``ray start --head``, then ``ray start
--address`` for a second node, each in its own process group and session
directory), runs the CLI against it in another process, and stops exactly the
processes it started: never ``ray stop``, which would stop every Ray instance
of this user on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

RAY = Path(sys.executable).with_name("ray")
FEDVAULT = Path(sys.executable).with_name("fedvault")
START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    """A loopback Ray cluster this test started: its address and its process groups."""

    address: str
    temp_dir: Path
    starters: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """Every live process of the cluster's groups (what ``ray start`` spawned)."""
        groups = {p.pid for p in self.starters}
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) in groups and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return found


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}


def _start_node(cluster: Cluster, args: list[str], log: Path) -> None:
    """``ray start --block``: the node's processes share this new process group."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(RAY), "start", "--block", "--disable-usage-stats", "--num-cpus", "1", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_ray_env(),
            start_new_session=True,
        )
    cluster.starters.append(proc)


def _driver(cluster: Cluster, body: str) -> str:
    """Run ``body`` in a separate Ray driver connected to ``cluster``; its stdout."""
    code = f"import json, sys, time, ray\nray.init(address={cluster.address!r})\n{body}"
    run = subprocess.run(
        [sys.executable, "-c", code],
        env=_ray_env(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S + 30,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _wait_for_nodes(cluster: Cluster, count: int) -> None:
    """Until the cluster has ``count`` live nodes."""
    _driver(
        cluster,
        f"deadline = time.monotonic() + {START_TIMEOUT_S}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
        "    assert time.monotonic() < deadline, ray.nodes()\n"
        "    time.sleep(0.5)\n",
    )


def _actor_nodes(cluster: Cluster) -> set[str]:
    """The nodes Flower's ClientApp actors ran on, from the cluster's GCS (dead ones too)."""
    out = _driver(
        cluster,
        "from ray._private.state import actors\n"
        "print(json.dumps(sorted({a['Address']['NodeID'] for a in actors().values()\n"
        "    if a['ActorClassName'].endswith('ClientAppActor')})))\n",
    )
    return set(json.loads(out.strip().splitlines()[-1]))


def _stop(cluster: Cluster) -> list[psutil.Process]:
    """SIGTERM, then SIGKILL, to the cluster's process groups; the processes left over."""
    for proc in reversed(cluster.starters):  # the worker node first, then the head
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while cluster.processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    for proc in cluster.starters:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    time.sleep(0.5)
    return cluster.processes()


@pytest.fixture
def two_nodes() -> Iterator[Cluster]:
    """A head and a worker node, one CPU each, on 127.0.0.1; stopped and checked after."""
    port = _free_port()
    # Short: Ray's socket paths live under it and must fit in 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="fvray-"))
    cluster = Cluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir)
    loopback = ["--node-ip-address", "127.0.0.1"]
    try:
        _start_node(
            cluster,
            [
                "--head",
                "--port",
                str(port),
                "--temp-dir",
                str(temp_dir),
                "--include-dashboard",
                "false",
                "--dashboard-port",
                str(_free_port()),
                "--ray-client-server-port",
                str(_free_port()),
                "--dashboard-agent-listen-port",
                str(_free_port()),
                *loopback,
            ],
            temp_dir / "head.log",
        )
        _start_node(
            cluster,
            [
                "--address",
                cluster.address,
                "--dashboard-agent-listen-port",
                str(_free_port()),
                *loopback,
            ],
            temp_dir / "worker.log",
        )
        _wait_for_nodes(cluster, 2)
        yield cluster
    finally:
        left = _stop(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes left running: {[p.pid for p in left]}"


@pytest.mark.timeout(240)
def test_simulate_joins_a_running_two_node_cluster(two_nodes: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [
            str(FEDVAULT),
            "simulate",
            "--hospitals",
            "4",
            "--rounds",
            "1",
            "--secure-aggregation",
            "none",
            "--out",
            str(out),
            "--ray-address",
            two_nodes.address,
        ],
        capture_output=True,
        text=True,
        env=_ray_env(),
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["status"] == "finished"
    assert len(report["rounds"]) == 1
    everyone = [f"hospital-{i}" for i in range(1, 5)]
    assert all(sorted(r["participants"]) == everyone for r in report["rounds"])
    # The hospitals ran on both of the cluster's nodes, and joining left it running.
    assert len(_actor_nodes(two_nodes)) == 2
    assert all(p.poll() is None for p in two_nodes.starters)
