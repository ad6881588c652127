"""Worker processes that load and sum a share of every update's ciphertext chunks.

TenSEAL's SEAL binding holds the GIL while it parses a ciphertext, so threads
cannot load chunks in parallel; processes can. Each worker owns a fixed range
of chunk indices for each open aggregation and keeps the running sum of that
range itself: per update it receives only its range's serialized chunks, and
only the final sum comes back (serialized by SEAL, as the coordinator's own
range is), so nothing is serialized twice and no process holds more than its
share of one update plus its share of the sum.

The pool is started once per process and lives across rounds. Workers are
fresh interpreters (``python -m fedvault.privacy.he_pool FD``) talking over a
socket pair: the coordinator runs gRPC threads, which must not be forked, and
multiprocessing's spawn would re-import the caller's ``__main__``. A worker
exits when the coordinator's end of its socket closes. Where workers cannot
start, the aggregation stays in one process.

Protocol, in pipe order (a reply only where marked):
``("open", id, context_bytes, fingerprint)``,
``("stage", id, start, expected, blobs)`` -> ``None`` or ``(error, cause)``,
``("commit", id)``, ``("abort", id)``, ``("result", id)`` -> ``list[bytes]``
or ``(error, cause)``, ``("drop", id)``.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from fedvault.errors import FedvaultError, MalformedUpdateError

__all__ = ["WorkerPool", "pool"]

log = logging.getLogger(__name__)


class _Worker:
    """One worker process and the coordinator's end of its socket."""

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        with parent, child:
            fd = child.fileno()
            # The parent's import path, so the worker imports the same fedvault.
            path = os.pathsep.join(p for p in sys.path if p)
            self.process = subprocess.Popen(
                [sys.executable, "-m", "fedvault.privacy.he_pool", str(fd)],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
            self.conn = Connection(parent.detach())

    def ready(self) -> None:
        """Wait until the worker has imported SEAL; raise ``OSError`` if it does not."""
        if not self.conn.poll(_START_TIMEOUT_S) or self.conn.recv() != "ready":
            self.process.kill()
            raise OSError(f"aggregation worker {self.process.pid} did not start")


class WorkerPool:
    """``size`` spawned worker processes, each addressed by index."""

    def __init__(self, size: int) -> None:
        self.workers = [_Worker() for _ in range(size)]
        try:
            for worker in self.workers:
                worker.ready()
        except (OSError, EOFError) as exc:
            for worker in self.workers:
                worker.process.kill()
            raise OSError(f"aggregation workers did not start: {exc}") from exc
        self.lock = threading.Lock()
        self._ids = itertools.count()
        self._dropped: list[int] = []

    def new_id(self) -> int:
        """A fresh aggregation id."""
        return next(self._ids)

    def drop_later(self, agg_id: int) -> None:
        """Release an aggregation's sums at the next exchange (safe from a finalizer)."""
        self._dropped.append(agg_id)

    def send(self, index: int, message: tuple[Any, ...]) -> None:
        """Send one message to worker ``index``; call with :attr:`lock` held."""
        while self._dropped:
            dropped = ("drop", self._dropped.pop())
            for worker in self.workers:
                self._send(worker, dropped)
        self._send(self.workers[index], message)

    def _send(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        try:
            worker.conn.send(message)
        except (OSError, EOFError) as exc:
            raise self._died(worker) from exc

    def recv(self, index: int) -> Any:
        """Worker ``index``'s reply; call with :attr:`lock` held."""
        worker = self.workers[index]
        try:
            return worker.conn.recv()
        except (OSError, EOFError) as exc:
            raise self._died(worker) from exc

    def _died(self, worker: _Worker) -> FedvaultError:
        global _pool
        _pool = None  # the next aggregation starts a fresh pool
        # An internal failure (FedvaultError itself): the partial sum it held is lost.
        return FedvaultError(
            f"aggregation worker process {worker.process.pid} died (exit code "
            f"{worker.process.poll()}); the round's partial sum is lost: retry the round, "
            "and check the coordinator's memory limit"
        )


#: Seconds a worker may take to start (import TenSEAL) on a loaded machine.
_START_TIMEOUT_S = 120.0

_pool: WorkerPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def pool(size: int) -> WorkerPool | None:
    """Return the pool of at least ``size`` workers of this process, started on first use.

    ``None`` where workers cannot start (no runnable interpreter, too few
    resources): the caller then aggregates in its own process.
    """
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid() or len(_pool.workers) < size:
            try:
                _pool, _pool_pid = WorkerPool(size), os.getpid()
            except (OSError, subprocess.SubprocessError) as exc:
                log.warning("summing encrypted updates in one process: %s", exc)
                return None
        return _pool


# --- the worker side -----------------------------------------------------------


class _Share:
    """A worker's part of one aggregation: its context, its sum, the update staged."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.sum: list[Any] | None = None
        self.pending: list[Any] | None = None

    def stage(self, start: int, expected: int, blobs: list[bytes]) -> Any:
        self.pending = None
        try:
            self.pending = self.ctx.load_ciphertexts(blobs, start, expected)
        except MalformedUpdateError as exc:
            return exc, exc.__cause__
        return None

    def commit(self) -> None:
        cts, self.pending = self.pending, None
        assert cts is not None
        if self.sum is None:  # the first update: its chunks become the sum
            self.sum = cts
            return
        add = self.ctx.evaluator.add_inplace
        for acc, ct in zip(self.sum, cts, strict=True):
            add(acc, ct)

    def result(self) -> list[bytes]:
        from fedvault.privacy import seal_bytes

        assert self.sum is not None
        return [seal_bytes.dump(ct) for ct in self.sum]


def _serve(conn: Connection) -> None:
    """Worker main loop: runs until the parent closes its end of the socket."""
    from fedvault.privacy.he_context import HeContext

    # Ctrl-C at the coordinator reaches its whole process group: the worker
    # leaves when the coordinator closes the socket, not before.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn.send("ready")
    contexts: dict[str, HeContext] = {}
    shares: dict[int, _Share] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind, agg_id = message[0], message[1]
        if kind == "open":
            if message[3] not in contexts:
                contexts.clear()  # one key epoch at a time in practice
                contexts[message[3]] = HeContext.from_bytes(message[2])
            shares[agg_id] = _Share(contexts[message[3]])
        elif kind == "stage":
            conn.send(shares[agg_id].stage(*message[2:]))
        elif kind == "commit":
            shares[agg_id].commit()
        elif kind == "abort":
            shares[agg_id].pending = None
        elif kind == "result":
            conn.send(shares[agg_id].result())
        else:  # "drop"
            shares.pop(agg_id, None)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
