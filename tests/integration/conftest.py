"""Fixtures for the deployment tests: one real ``fedvault demo`` run, and process checks.

The demo run (about two minutes) is shared by every test of a module that
inspects it. Its Fleet gateway's inbound traffic is captured by a
test-only ``sitecustomize`` hook (:data:`CAPTURE_HOOK`), so the tests can check
what the coordinator *received*, not just what it chose to store.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedvault.flower_env import terminate_tree

#: Seconds the demo (2 rounds, 3 hospitals) may take; it takes ~2 min on 2 cores.
DEMO_TIMEOUT_S = 400

CAPTURE_ENV = "FEDVAULT_TEST_RELAY_CAPTURE"

#: Test-only ``sitecustomize``: inside the Fleet gateway process (and nowhere
#: else) it copies every request body the gateway forwards to the SuperLink into
#: ``$FEDVAULT_TEST_RELAY_CAPTURE``. All hospital traffic enters the coordinator
#: through that gateway, so these files are exactly what the coordinator received.
CAPTURE_HOOK = """\
import os
import sys

_DIR = os.environ.get("FEDVAULT_TEST_RELAY_CAPTURE")
if _DIR and "fedvault.coordinator.fleet_gateway" in getattr(sys, "orig_argv", ()):
    import itertools
    import threading

    import httpx

    _count = itertools.count()
    _lock = threading.Lock()
    _post = httpx.AsyncClient.post

    async def _capturing_post(self, url, *args, **kwargs):
        content = kwargs.get("content")
        if isinstance(content, (bytes, bytearray)):
            route = str(url).split("/v1/", 1)[-1].replace("/", "-")
            with _lock:
                n = next(_count)
            name = os.path.join(_DIR, f"{os.getpid()}-{n:06d}-{route}.bin")
            with open(name + ".part", "wb") as f:
                f.write(content)
            os.replace(name + ".part", name)
        return await _post(self, url, *args, **kwargs)

    httpx.AsyncClient.post = _capturing_post
"""


# ---- processes -----------------------------------------------------------------------


def _processes_mentioning(marker: Path) -> dict[int, str]:
    """Live processes whose command line or environment names ``marker``.

    Every fedvault/Flower process of a run carries its directory: daemons in
    their arguments, ``flower-superexec`` and the app processes in ``FLWR_HOME``.
    """
    needle = str(marker).encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        proc = Path("/proc") / entry
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes()
        except (OSError, IndexError):
            continue
        if state != "Z" and (needle in cmdline or needle in environ):
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")[:300]
    return found


def _kill_mentioning(marker: Path) -> None:
    """Clean-up after a failed run: SIGKILL what this test started (by pid)."""
    for pid in _processes_mentioning(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
    return True


# ---- the shared demo run ----------------------------------------------------------------


@dataclass(frozen=True)
class DemoRun:
    out: Path
    capture: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    left_at_exit: dict[int, str]
    left_after_settle: dict[int, str]

    def explain(self) -> str:
        out, err = self.stdout[-3000:], self.stderr[-3000:]
        return f"exit {self.returncode}\nstdout:\n{out}\nstderr:\n{err}"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoRun]:
    root = tmp_path_factory.mktemp("demo")
    out, hook, capture = root / "run", root / "hook", root / "relay-capture"
    hook.mkdir()
    capture.mkdir()
    (hook / "sitecustomize.py").write_text(CAPTURE_HOOK)
    pythonpath = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, **{CAPTURE_ENV: str(capture)})
    argv = [sys.executable, "-m", "fedvault", "demo", "--rounds", "2", "--out", str(out)]
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        terminate_tree(proc, grace=15.0)  # type: ignore[arg-type]
        _kill_mentioning(out)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"fedvault demo did not finish in {DEMO_TIMEOUT_S} s\n"
            f"{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    seconds = time.monotonic() - started
    left_at_exit = _processes_mentioning(out)
    _wait_for(lambda: not _processes_mentioning(out), 5.0)
    left_after_settle = _processes_mentioning(out)
    print(f"fedvault demo --rounds 2 took {seconds:.1f} s")
    try:
        yield DemoRun(
            out, capture, proc.returncode, stdout, stderr, seconds, left_at_exit, left_after_settle
        )
    finally:
        _kill_mentioning(out)


@pytest.fixture
def processes_mentioning() -> Callable[[Path], dict[int, str]]:
    """:func:`_processes_mentioning`, for tests that start daemons themselves."""
    return _processes_mentioning


@pytest.fixture
def wait_for() -> Callable[[Callable[[], bool], float], bool]:
    """Poll a predicate until true or ``timeout`` seconds pass; returns whether it became true."""
    return _wait_for
