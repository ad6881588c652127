"""The soak's SuperExec: Flower's task loop for many SuperNodes, one fork per task.

A stock SuperNode (``--isolation subprocess``) starts its own
``flower-superexec``, which starts a fresh ``flwr-clientapp`` interpreter for
every message. Measured here (2 cores): that interpreter pays ~3.6 s of imports
(torch, opacus, TenSEAL, fedvault) per message and a SuperNode + SuperExec pair
holds ~220 MB, so 100 hospitals x 50 rounds (~5,300 ClientApp runs) would take
hours and ~22 GB before any training.

The soak instead starts each SuperNode with ``--isolation process`` (Flower's
mode for an external SuperExec) and runs this one process for all of them. It
is Flower's SuperExec loop (``flwr.supercore.superexec.run_superexec``) with
two changes: it polls every node's Runtime API in turn, and its executor forks
a child from this already-imported interpreter instead of exec'ing
``flwr-clientapp``. The child then runs Flower's own ``run_clientapp`` with the
task's token, exactly what ``flwr-clientapp`` runs: it pulls the message, the
context and the FAB from that hospital's SuperNode, installs the FAB into that
hospital's ``FLWR_HOME``, loads the app named in the FAB and pushes the reply.
Each message still gets a fresh process (state lives in the hospital's files,
as in production); only the import cost is shared, copy-on-write.

The parent stays single-threaded (no torch op runs before a fork), and at most
``--max-children`` tasks run at once, gated the way Flower's executors gate
capacity: a task is acquired only when it can be launched.

Run as ``python -m bench.soak_executor --nodes NODES.json``; ``NODES.json`` is a
list of ``{"name", "runtime", "flwr_home"}`` objects and is re-read when it
changes, so hospitals can join while the executor runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main"]


@dataclass(frozen=True)
class _Node:
    name: str
    runtime: str  # host:port of the SuperNode's Runtime API (loopback, plain HTTP)
    flwr_home: str  # the SuperNode's FLWR_HOME: where its ClientApps install the FAB


class _Pool:
    """Forked ClientApp tasks in flight, capped at ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.children: dict[int, tuple[str, float]] = {}
        self.launched = 0
        self.failed = 0
        self.task_s: list[float] = []  # launch to exit, per finished task
        self.peak_children = 0

    @property
    def full(self) -> bool:
        return len(self.children) >= self.limit

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            name, started = self.children.pop(pid, ("?", time.monotonic()))
            self.task_s.append(time.monotonic() - started)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                self.failed += 1
                print(f"[soak-executor] {name}: ClientApp task exited {code}", flush=True)

    def stop(self, grace: float) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.children:
            self.reap()
            time.sleep(0.01)


class ForkExecutor:
    """A Flower ``Executor`` that forks instead of exec'ing ``flwr-clientapp``."""

    def __init__(self, pool: _Pool, node: _Node) -> None:
        self.pool, self.node = pool, node

    def get_eligible_capacity(
        self, supported_task_types: set[Any], **_: Any
    ) -> tuple[set[Any], set[str]]:
        return (set() if self.pool.full else set(supported_task_types)), set()

    def wait_for_capacity(self, *_: Any, **__: Any) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor import LaunchResult

        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            _run_child(spec, self.node)
        self.pool.children[pid] = (self.node.name, time.monotonic())
        self.pool.launched += 1
        self.pool.peak_children = max(self.pool.peak_children, len(self.pool.children))
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        self.pool.reap()

    def close(self) -> None:
        return None


def _run_child(spec: Any, node: _Node) -> None:
    """Body of a forked task: Flower's ``flwr-clientapp`` main, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ["FLWR_HOME"] = node.flwr_home
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=None,
            parent_pid=spec.parent_pid,
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends every task with sys.exit
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _preload() -> None:
    """Import what every ClientApp run imports, once, before any fork."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401
    import opacus  # noqa: F401

    import fedvault.client.client_app
    import fedvault.client.data
    import fedvault.client.kit_sites
    import fedvault.client.training  # noqa: F401
    from fedvault.examples import get_example

    for name in ("breast-cancer", "digits"):
        get_example(name)


class _Nodes:
    """The node list file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.mtime = -1.0
        self.nodes: list[_Node] = []

    def refresh(self) -> bool:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self.mtime:
            return False
        try:
            rows = json.loads(self.path.read_text())
        except json.JSONDecodeError:
            return False  # caught mid-write; the writer replaces it atomically anyway
        self.mtime = mtime
        self.nodes = [_Node(**row) for row in rows]
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.soak_executor")
    parser.add_argument("--nodes", type=Path, required=True)
    parser.add_argument("--max-children", type=int, default=max(2, os.cpu_count() or 1))
    parser.add_argument("--stats", type=Path, default=None, help="write task statistics here")
    parser.add_argument(
        "--poll", type=float, default=1.0, help="seconds between sweeps (Flower's default)"
    )
    args = parser.parse_args(argv)

    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    _preload()
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    pool = _Pool(args.max_children)
    nodes = _Nodes(args.nodes)
    agents: list[tuple[_Node, Any, Any]] = []
    errors: dict[str, float] = {}
    start = 0
    print(f"[soak-executor] ready (pid {os.getpid()}, {args.max_children} children)", flush=True)
    try:
        while not stopping:
            if nodes.refresh():
                known = {a[0].name for a in agents}
                for node in nodes.nodes:
                    if node.name in known:
                        continue
                    # No retry invoker: a node that is restarting is skipped this sweep.
                    client = RuntimeHttpClient.from_server_address(
                        server_address=node.runtime,
                        insecure=True,
                        root_certificates=None,
                        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
                    )
                    plugin = AutoExecPlugin(
                        runtime_api_address=node.runtime,
                        insecure=True,
                        root_certificates_path=None,
                        executor=ForkExecutor(pool, node),
                    )
                    agents.append((node, client, plugin))
            pool.reap()
            n = len(agents)
            for k in range(n):
                if stopping or pool.full:
                    start = (start + k) % n  # resume here: every node gets its turn
                    break
                node, client, plugin = agents[(start + k) % n]
                try:
                    res = client.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
                    )
                except Exception as exc:  # a node that is restarting: skip it this sweep
                    now = time.monotonic()
                    if now - errors.get(node.name, 0.0) > 60:
                        errors[node.name] = now
                        print(f"[soak-executor] {node.name}: {exc!r}", flush=True)
                    continue
                if res.HasField("task") and res.token:
                    plugin.launch_task(token=res.token, task=res.task)
            else:
                start = (start + 1) % max(n, 1)
            time.sleep(0.05 if pool.full else args.poll)
    finally:
        pool.stop(grace=5.0)
        for _, client, _ in agents:
            with contextlib.suppress(Exception):
                client.close()
        stats = _stats(pool)
        print(f"[soak-executor] stopped: {json.dumps(stats)}", flush=True)
        if args.stats is not None:
            args.stats.write_text(json.dumps(stats))


def _stats(pool: _Pool) -> dict[str, Any]:
    times = sorted(pool.task_s)

    def q(f: float) -> float | None:
        return round(times[min(len(times) - 1, int(f * len(times)))], 3) if times else None

    return {
        "tasks_launched": pool.launched,
        "tasks_failed": pool.failed,
        "peak_concurrent_tasks": pool.peak_children,
        "task_median_s": q(0.5),
        "task_p95_s": q(0.95),
        "task_cpu_s_total": round(sum(os.times()[2:4]), 1),  # children's user + system
    }


if __name__ == "__main__":
    main()
