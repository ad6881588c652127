"""Fixtures for the deployment tests: one real ``fedvault demo`` run, and process checks.

The demo run (about two minutes) is shared by every test of the session that
inspects it. Its Fleet gateway's inbound traffic is captured by a
test-only ``sitecustomize`` hook (:data:`CAPTURE_HOOK`), so the tests can check
what the coordinator *received*, not just what it chose to store.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

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


#: ``fedvault demo`` announces each daemon's metrics endpoint on a line of its own.
METRICS_LINE = re.compile(r"^metrics: (\S+) (http://\S+/metrics)\s*$")
#: Seconds between scrapes of every announced endpoint while the demo runs.
SCRAPE_EVERY_S = 2.0


class _DemoWatch:
    """Reads the demo's output as it comes and scrapes every /metrics it announces."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.urls: dict[str, str] = {}
        self.scrapes: dict[str, list[str]] = {}
        self._out: list[str] = []
        self._err: list[str] = []
        self._done = threading.Event()
        assert proc.stdout is not None and proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._read, args=(proc.stderr, self._err), daemon=True),
            threading.Thread(target=self._scrape, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: IO[str], lines: list[str]) -> None:
        for line in stream:
            lines.append(line)
            if match := METRICS_LINE.match(line):
                self.urls[match.group(1)] = match.group(2)

    def _scrape(self) -> None:
        while not self._done.wait(SCRAPE_EVERY_S):
            for name, url in list(self.urls.items()):
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        text = response.read().decode()
                except OSError:
                    continue  # not serving yet, or already stopped
                self.scrapes.setdefault(name, []).append(text)

    def finish(self) -> tuple[str, str]:
        """Stop scraping once the demo's output has ended; its (stdout, stderr)."""
        for thread in self._threads[:2]:
            thread.join(timeout=30)
        self._done.set()
        self._threads[2].join(timeout=30)
        return "".join(self._out), "".join(self._err)


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
    # Daemon name ("coordinator", "hospital-1", ...) -> its /metrics texts, scraped while
    # the demo ran (see _DemoWatch), oldest first.
    scrapes: dict[str, list[str]] = field(default_factory=dict)
    metrics_urls: dict[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        out, err = self.stdout[-3000:], self.stderr[-3000:]
        return f"exit {self.returncode}\nstdout:\n{out}\nstderr:\n{err}"


# Session scope: one run serves every module that inspects it (deployment, dashboard).
@pytest.fixture(scope="session")
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
    watch = _DemoWatch(proc)
    try:
        proc.wait(timeout=DEMO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        terminate_tree(proc, grace=15.0)  # type: ignore[arg-type]
        _kill_mentioning(out)
        stdout, stderr = watch.finish()
        pytest.fail(
            f"fedvault demo did not finish in {DEMO_TIMEOUT_S} s\n"
            f"{stdout[-3000:]}\n{stderr[-3000:]}"
        )
    stdout, stderr = watch.finish()
    seconds = time.monotonic() - started
    left_at_exit = _processes_mentioning(out)
    _wait_for(lambda: not _processes_mentioning(out), 5.0)
    left_after_settle = _processes_mentioning(out)
    print(f"fedvault demo --rounds 2 took {seconds:.1f} s")
    try:
        yield DemoRun(
            out, capture, proc.returncode, stdout, stderr, seconds, left_at_exit,
            left_after_settle, watch.scrapes, dict(watch.urls),
        )  # fmt: skip
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
