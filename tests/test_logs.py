"""Daemon logs: plain or JSON lines, quiet polling, one line per round event, true start times."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fedvault.coordinator.records import ModelBlob, Participation, RoundCommit
from fedvault.coordinator.round_events import RoundEventFollower
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.errors import InvalidConfigError
from fedvault.logs import configure_logging, context_logger

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR) \S+ .+$")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes the root logger: put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    chatty = {n: logging.getLogger(n).level for n in ("httpx", "flwr", "fedvault.coordinator")}
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    for name, lvl in chatty.items():
        logging.getLogger(name).setLevel(lvl)


def test_text_lines_are_one_plain_line_per_record_with_context() -> None:
    out = io.StringIO()
    configure_logging("text", stream=out)
    log = context_logger("fedvault.coordinator", job="study")
    long_reason = "hospital-2 refused: " + "x" * 300  # far past 80 columns: not wrapped
    log.info("committed: 3 participants in 12.4 s", extra={"round": 3})
    log.warning("attempt 1 failed: %s", long_reason, extra={"round": 4})
    logging.getLogger("fedvault.client").info("data ok", extra={"hospital": "hospital-a"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all(TEXT_LINE.match(line) for line in lines), lines
    assert "\x1b" not in out.getvalue()
    assert lines[0].endswith(
        " INFO fedvault.coordinator job=study round=3 committed: 3 participants in 12.4 s"
    )
    assert lines[1].endswith(f"job=study round=4 attempt 1 failed: {long_reason}")
    assert lines[2].endswith(" INFO fedvault.client hospital=hospital-a data ok")


def test_json_lines_have_stable_keys_and_the_daemons_context() -> None:
    out = io.StringIO()
    configure_logging("json", stream=out, context={"hospital": "hospital-a"})
    logging.getLogger("fedvault.client").info("round %d trained", 2, extra={"round": 2})
    context_logger("fedvault.x", job="j", hospital="hospital-b").warning("own hospital")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("fedvault.x").exception("failed")
    first, second, third = (json.loads(line) for line in out.getvalue().splitlines())
    assert set(first) == {"ts", "level", "logger", "message", "hospital", "round"}
    assert first["level"] == "INFO" and first["logger"] == "fedvault.client"
    assert first["message"] == "round 2 trained" and first["round"] == 2
    assert first["hospital"] == "hospital-a"
    assert datetime.strptime(first["ts"], "%Y-%m-%dT%H:%M:%SZ").year >= 2024
    assert second["hospital"] == "hospital-b" and second["job"] == "j"  # its own value wins
    assert third["level"] == "ERROR" and "RuntimeError: boom" in third["exc_info"]


def test_polling_speaks_only_at_debug() -> None:
    out = io.StringIO()
    configure_logging("text", stream=out)
    logging.getLogger("httpx").info('HTTP Request: POST .../list-runs "HTTP/1.1 200 OK"')
    logging.getLogger("httpx").warning("connection refused")
    assert "list-runs" not in out.getvalue() and "connection refused" in out.getvalue()
    configure_logging("text", stream=out, level=logging.DEBUG)
    logging.getLogger("httpx").info("HTTP Request: POST .../list-runs")
    assert "list-runs" in out.getvalue()


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidConfigError, match="--log-format 'xml' is not one of text, json"):
        configure_logging("xml")


# -- round events and the rounds' true start times -----------------------------------------


def _ok(hospital: str) -> Participation:
    return Participation(hospital=hospital, status="ok", samples=10, epsilon=0.5)


def _blob(number: int) -> ModelBlob:
    return ModelBlob(round=number, kind="plain", blob=b"w" * 16, total_weight=20.0)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [
        f"round={getattr(r, 'round', None)} {r.getMessage()}"
        for r in caplog.records
        if r.name == "fedvault.coordinator" and getattr(r, "job", None) == "study"
    ]
    caplog.clear()
    return lines


def test_the_follower_logs_each_round_event_once_with_true_durations(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedvault.coordinator")
    url = sqlite_url(tmp_path / "store.sqlite")
    with RoundStore(url) as store:
        job = store.open_job("study", {"rounds": 2})
    follower = RoundEventFollower(url, "study")
    follower.poll()
    assert _lines(caplog) == ["round=1 started"]
    follower.poll()
    assert _lines(caplog) == []  # nothing new: nothing said

    began = datetime.now(UTC) - timedelta(seconds=12.4)
    with RoundStore(url) as store:
        store.record_failed_round(
            job.id,
            1,
            reason="1 of 2 required hospitals contributed",
            participations=[_ok("hospital-a")],
            started_at=began - timedelta(seconds=30),
        )
    follower.poll()
    assert _lines(caplog) == [
        "round=1 attempt 1 failed: 1 of 2 required hospitals contributed",
        "round=1 started (attempt 2)",
    ]
    with RoundStore(url) as store:
        participations = (_ok("hospital-a"), _ok("hospital-b"))
        commit = RoundCommit(
            number=1,
            model=_blob(1),
            participations=participations,
            train_loss=0.5,
            started_at=began,
        )
        store.commit_round(job.id, commit)
        views = store.rounds(job.id)
    follower.poll()
    committed = _lines(caplog)
    assert committed[1] == "round=2 started", committed
    match = re.fullmatch(r"round=1 committed: 2 participants in (\d+\.\d) s", committed[0])
    assert match is not None, committed
    assert 12.4 <= float(match.group(1)) < 15.0  # the store's times, not the poll's
    failed, ok = views
    assert failed.started_at == began - timedelta(seconds=30)
    assert ok.started_at == began and ok.committed_at is not None
    assert ok.committed_at - ok.started_at >= timedelta(seconds=12.4)

    with RoundStore(url) as store:
        store.commit_round(
            job.id,
            RoundCommit(number=2, model=_blob(2), participations=participations, train_loss=0.4),
        )
        store.set_job_status(job.id, "finished")
    follower.poll()
    assert _lines(caplog) == ["round=2 committed: 2 participants in 0.0 s"]  # no round 3

    late = RoundEventFollower(url, "study")  # a resubmission: earlier rounds were logged
    late.poll()
    assert _lines(caplog) == []


# -- a real daemon ----------------------------------------------------------------------------


def _read_until(proc: subprocess.Popen[str], needle: str, timeout_s: float) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    raise AssertionError(f"no {needle!r} within {timeout_s} s:\n" + "\n".join(lines))


@pytest.mark.timeout(120)
def test_a_hospital_daemon_logs_json_lines_with_its_name(tmp_path: Path) -> None:
    from fedvault.app.demo import prepare_consortium

    paths = prepare_consortium(tmp_path, hospitals=1, rounds=1, epsilon=3.0)
    data = paths["data"] / "hospital-1"
    argv = [
        sys.executable, "-m", "fedvault", "client", "start",
        "--kit", str(paths["kits"] / "hospitals" / "hospital-1"),
        "--data", str(data / "data.toml"), "--policy", str(data / "policy.toml"),
        "--state", str(tmp_path / "state"), "--log-format", "json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,  # a pipe, as a log file: not a terminal
        text=True,
        env={**os.environ, "COLUMNS": "80"},
        start_new_session=True,
    )
    try:
        lines = _read_until(proc, "SuperNode connecting", timeout_s=90)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records), records
    assert all(r["hospital"] == "hospital-1" for r in records), records
    assert any("data ok" in r["message"] for r in records), records


def test_an_unreadable_store_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedvault.coordinator")
    RoundEventFollower("sqlite:////proc/no-such-dir/store.sqlite", "study").poll()
    (record,) = [r for r in caplog.records if r.name == "fedvault.coordinator"]
    assert record.levelname == "WARNING" and "cannot read the rounds of job study" in record.message
