"""The web dashboard in a real headless browser, on the store of a real ``fedvault demo`` run.

Debian's Chromium (``apt-get install chromium``), driven by Playwright, opens the
dashboard served in-process on a copy of the finished demo's round store with
the demo's coordinator kit. Each of the demo's four operators presents its own
certificate (``client_certificates``); the server is verified against the
consortium CA (``NODE_EXTRA_CA_CERTS`` for Playwright's TLS, never "ignore
errors"). For each role the test reads the jobs page, the job page, the audit
log and a round's participants, checks what is shown and what is refused, and
keeps a full-page screenshot in ``test-artifacts/dashboard/<role>.png``. A
browser without a certificate is refused at the TLS handshake.

What each role sees follows the operator API's table (``ACCESS``); the guest's
limits are also asserted outright, so the test fails if a guest can read the
audit log, the ledger or the rounds, whatever the table says.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from fedvault.app.demo import JOB_NAME
from fedvault.coordinator.dashboard import serve_dashboard
from fedvault.coordinator.operator_api import ACCESS
from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, sqlite_url
from fedvault.kit import Kit
from fedvault.privacy.pki import Role

if TYPE_CHECKING:
    from conftest import DemoRun
    from playwright.sync_api import Browser, BrowserContext, Page

#: The first test pays for the shared demo run (~2 min) unless another module did.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSPITALS = ("hospital-1", "hospital-2", "hospital-3")
# A refused handshake, as Chromium words it (the exact error depends on when the alert lands).
HANDSHAKE_REFUSED = re.compile(
    r"net::ERR_(BAD_SSL_CLIENT_AUTH_CERT|SSL_PROTOCOL_ERROR|SOCKET_NOT_CONNECTED|"
    r"CONNECTION_RESET|CONNECTION_CLOSED|CONNECTION_ABORTED)"
)


@dataclass(frozen=True)
class Board:
    url: str
    origin: str
    operators: dict[str, Path]  # role name -> operator kit


@pytest.fixture(scope="module")
def board(demo: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    assert demo.returncode == 0, demo.explain()
    # A consistent copy, so the refusals this test causes are not written into the demo's store.
    copy = tmp_path_factory.mktemp("dashboard") / DEFAULT_STORE_FILENAME
    source = sqlite3.connect(demo.out / "coordinator" / DEFAULT_STORE_FILENAME)
    target = sqlite3.connect(copy)
    with source, target:
        source.backup(target)
    source.close()
    target.close()
    kits = demo.out / "kits"
    operators = {}
    for kit_dir in sorted((kits / "operators").iterdir()):
        role = Kit.load(kit_dir).role
        assert role is not None
        operators[role.value] = kit_dir
    assert sorted(operators) == sorted(r.value for r in Role), "the demo has one operator per role"
    server = serve_dashboard(sqlite_url(copy), Kit.load(kits / "coordinator"), port=0)
    try:
        yield Board(server.url, server.url.rstrip("/"), operators)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(board: Board) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    ca = board.operators["admin"] / "ca.pem"
    # Playwright's own TLS client presents the certificate; it must trust the consortium CA.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NODE_EXTRA_CA_CERTS", str(ca))
        with sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                yield chromium
            finally:
                chromium.close()


def _open_as(browser: Browser, board: Board, role: str) -> BrowserContext:
    kit = board.operators[role]
    cert = {"origin": board.origin, "certPath": str(kit / "operator.pem"),
            "keyPath": str(kit / "operator.key")}  # fmt: skip
    context = browser.new_context(
        client_certificates=[cert], viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(15_000)
    return context


def _allowed(role: Role, method: str) -> bool:
    return role.allows(ACCESS[method].required)


def _check_job_page(page: Page, role: Role) -> None:
    status = page.locator("#status")
    assert "finished" in status.inner_text() and "2 of 2 committed" in status.inner_text()
    assert re.search(r"auroc|accuracy", page.locator("#final-metrics").inner_text())
    rounds, ledger = page.locator("#rounds"), page.locator("#ledger")
    if _allowed(role, "ListRounds"):
        rows = rounds.locator("tbody tr.committed")
        assert rows.count() == 2
        for i in range(2):
            assert all(h in rows.nth(i).inner_text() for h in HOSPITALS)
        assert page.locator("#metrics-chart svg").is_visible()
    else:
        assert "Requires role engineer" in rounds.inner_text()
        assert rounds.locator("table, svg").count() == 0
    if _allowed(role, "GetPrivacyLedger"):
        chart = page.locator("#epsilon-chart svg")
        assert chart.is_visible()
        text = chart.text_content()
        assert all(h in text for h in HOSPITALS) and "budget ε = 3" in text
        assert ledger.locator("table").first.locator("tbody tr").count() == len(HOSPITALS)
    else:
        assert "Requires role auditor" in ledger.inner_text()
        assert ledger.locator("table, svg").count() == 0


@pytest.mark.parametrize("role", [r.value for r in sorted(Role, key=lambda r: r.level)])
def test_each_role_sees_what_its_certificate_allows(
    board: Board, browser: Browser, role: str
) -> None:
    who = Role(role)
    context = _open_as(browser, board, role)
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    try:
        assert page.goto(board.url).status == 200
        assert page.locator("#role").inner_text() == role
        page.get_by_role("link", name=JOB_NAME).click()
        page.wait_for_url(f"**/jobs/{JOB_NAME}")
        _check_job_page(page, who)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{role}.png"), full_page=True)

        audit = page.goto(f"{board.url}audit")
        if who is Role.GUEST:  # outright, not from the table: a guest never reads the audit log
            assert audit.status == 403
            assert "requires role auditor" in page.locator("#error").inner_text()
            assert page.locator("table").count() == 0
            assert page.get_by_role("link", name="Audit log").count() == 0
        assert audit.status == (200 if _allowed(who, "GetAuditLog") else 403)
        if audit.status == 200:
            assert page.locator("#chain").inner_text() == "Hash chain verified: intact."
            kinds = page.locator("#audit-log tbody td:nth-child(4)").all_inner_texts()
            assert {"round.committed", "node_enrolled"} <= set(kinds)

        participants = page.goto(f"{board.url}jobs/{JOB_NAME}/rounds/1")
        if _allowed(who, "ListParticipants"):
            assert participants.status == 200
            assert "3 participated, 0 refused, 0 rejected, 0 failed" in page.inner_text("main")
        else:
            assert participants.status == 403
            assert "requires role engineer" in page.locator("#error").inner_text()
    finally:
        context.close()
    # No CSP violation, nothing failed to load, but for the refusals this test asked for.
    assert [e for e in errors if "status of 403 (Forbidden)" not in e] == [], errors
    assert requested and all(url.startswith(board.origin + "/") for url in requested), requested


def test_a_guest_is_refused_the_audit_log_ledger_and_rounds(board: Board, browser: Browser) -> None:
    context = _open_as(browser, board, "guest")
    page = context.new_page()
    try:
        page.goto(f"{board.url}jobs/{JOB_NAME}")
        body = page.inner_text("main")
        for leak in ("Hash chain", "node_enrolled", "noise σ", *HOSPITALS):
            assert leak not in body, leak
        for path in ("audit", f"audit?job={JOB_NAME}", f"jobs/{JOB_NAME}/rounds/2"):
            answer = page.goto(f"{board.url}{path}")
            assert answer.status == 403, path
            assert answer.headers["x-fedvault-required-role"] in ("auditor", "engineer")
            assert "node_enrolled" not in page.content()
    finally:
        context.close()


def test_a_browser_without_a_certificate_is_refused_at_the_handshake(
    board: Board, browser: Browser
) -> None:
    from playwright.sync_api import Error

    # It trusts the server (so the refusal is about its missing certificate, not the CA's).
    context = browser.new_context(ignore_https_errors=True)
    try:
        with pytest.raises(Error, match=HANDSHAKE_REFUSED):
            context.new_page().goto(board.url)
    finally:
        context.close()
    control = _open_as(browser, board, "admin")  # the server is up: the refusal was TLS's
    try:
        assert control.new_page().goto(board.url).status == 200
    finally:
        control.close()


def test_the_demo_coordinator_served_the_dashboard_it_announced(demo: DemoRun) -> None:
    announced = re.search(r"dashboard: (https://127\.0\.0\.1:\d+/)", demo.stdout)
    assert announced, demo.stdout[-3000:]
    log = (demo.out / "logs" / "coordinator.log").read_text()
    assert f"dashboard on {announced.group(1)}" in log, log[-3000:]
