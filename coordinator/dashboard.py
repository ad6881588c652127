"""The coordinator's web dashboard: read-only pages over mutual TLS, gated by role.

``fedvault coordinator start --dashboard-port N`` serves it on the operator API's
host. Like the operator API (:mod:`.operator_api`), it accepts only a client
certificate issued by the consortium CA (checked by TLS at the handshake, then
once more per request with :func:`~fedvault.privacy.pki.verify_issued_by`) and
reads the caller's role from that verified certificate on every request, never
from anything the browser sends. A browser without such a certificate is
refused at the handshake and gets no HTTP answer at all.

What a role sees is decided by the operator API's own table,
:data:`~fedvault.coordinator.operator_api.ACCESS`: every part of a page is one
operator-API read, shown only when the caller's role may call that method.

=========================  ==================  =============================================
page / section             operator method     what it shows
=========================  ==================  =============================================
``/`` jobs, job status     GetJobStatus        status, rounds done, final metrics, max ε
rounds, metric chart       ListRounds          every attempt; participants, refusals and
                                               rejections per round; metrics per round
``/jobs/J/rounds/N``       ListParticipants    each hospital's part in round N, with reasons
privacy ledger, ε chart    GetPrivacyLedger    cumulative ε per hospital per round, budget
``/audit``                 GetAuditLog         the audit trail and its hash-chain verification
=========================  ==================  =============================================

A section the role may not read says which role it needs; a page the role may
not read answers 403 naming that role (header ``X-Fedvault-Required-Role``), and
the refusal is appended to the audit trail as ``operator_denied``, as the
operator API does. The dashboard is read-only: GET and HEAD, no forms, every
other method 405. Charts are rendered on the server (matplotlib, inline SVG)
and the only other asset is a small bundled style sheet, so a page loads
nothing from anywhere else and runs no script (its Content-Security-Policy
forbids both).
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import parse_qs, quote, unquote, urlsplit

from cryptography import x509
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from fedvault.errors import FedvaultError, InvalidConfigError
from fedvault.kit import Kit
from fedvault.privacy.pki import Role, common_name, role_from_certificate, verify_issued_by
from fedvault.proto import admin_pb2

from .operator_api import (
    ACCESS,
    REQUIRED_ROLE_METADATA,
    Caller,
    OperatorServicer,
    Rule,
    require_coordinator_kit,
)
from .records import AuditEvent, Job, LedgerRow, Participation, RoundView
from .store import RoundStore

__all__ = [
    "REQUIRED_ROLE_HEADER",
    "Dashboard",
    "DashboardServer",
    "Response",
    "serve_dashboard",
]

_log = logging.getLogger(__name__)

_ASSETS = Path(__file__).with_name("dashboard_templates")
#: Response header of a 403: the least role that may read the page (as the API's metadata).
REQUIRED_ROLE_HEADER = "X-" + "-".join(p.capitalize() for p in REQUIRED_ROLE_METADATA.split("-"))
_AUDIT_EVENTS = 200  # newest audit events on the audit page
_DETAIL_MAX = 300  # characters of an audit event's JSON detail shown in a row
_HANDSHAKE_TIMEOUT_S = 10.0  # a client that stalls the TLS handshake holds one thread this long
_REQUEST_TIMEOUT_S = 30.0
# No script, no remote anything. Inline styles: matplotlib's SVG styles its shapes inline.
_CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_HTML = "text/html; charset=utf-8"


@dataclass(frozen=True)
class Response:
    """An HTTP answer: status, body and content type (plus extra headers)."""

    status: HTTPStatus
    body: bytes
    content_type: str = _HTML
    headers: Mapping[str, str] = field(default_factory=dict)


class _PageError(Exception):
    """A page cannot be served: its status and the sentence that says why."""

    def __init__(self, status: HTTPStatus, message: str, required: Role | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.required = required


# -- charts ---------------------------------------------------------------------------------


_CHART_LOCK = threading.Lock()  # matplotlib's rcParams and font cache are process-wide


def _svg(draw: Callable[[Any], None], salt: str) -> Markup:
    """Render ``draw(figure)`` as an ``<svg>`` element to inline in a page.

    Text stays text (``svg.fonttype = none``), so a page's charts are searchable
    and name their hospitals; ``salt`` keeps two charts' element ids apart.
    """
    # Imported here: matplotlib is slow to import and only pages with charts need it.
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    out = io.StringIO()
    with _CHART_LOCK, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig = Figure(figsize=(6.4, 3.4), layout="constrained")
        FigureCanvasSVG(fig)  # never a GUI backend
        draw(fig)
        fig.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    # matplotlib escapes every label it writes; drop the XML prologue to inline it.
    return Markup(text[text.index("<svg") :])


def _finish_axes(ax: Any, *, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set(title=title, xlabel="round", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _points(
    rounds: Sequence[RoundView], value: Callable[[RoundView], float | None]
) -> list[tuple[int, float]]:
    """``(round, value)`` of each round that has the value."""
    return [(r.number, v) for r in rounds if (v := value(r)) is not None]


def _metric(name: str) -> Callable[[RoundView], float | None]:
    return lambda r: r.eval_metrics.get(name)


def metrics_chart(rounds: Sequence[RoundView]) -> Markup:
    """Pooled test metrics per committed round, and evaluation and training loss."""
    committed = [r for r in rounds if r.status == "committed"]
    names = sorted({k for r in committed for k in r.eval_metrics} - {"loss"})
    scores = {n: _points(committed, _metric(n)) for n in names}
    if "accuracy" not in scores:  # rounds stored before tasks pooled their metrics
        scores["accuracy"] = _points(committed, lambda r: r.eval_accuracy)
    losses = {
        "test loss": _points(committed, lambda r: r.eval_loss),
        "train loss": _points(committed, lambda r: r.train_loss),
    }

    def draw(fig: Any) -> None:
        for ax, series in zip(fig.subplots(1, 2), (scores, losses), strict=True):
            for label, points in series.items():
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=label)
        left, right = fig.axes
        if not {"mae", "rmse"} & set(names):  # classification scores live in [0, 1]
            left.set_ylim(0.0, 1.02)
        _finish_axes(left, title="Test metrics, pooled", ylabel="value")
        _finish_axes(right, title="Loss", ylabel="loss")

    return _svg(draw, "metrics")


def epsilon_chart(ledger: Sequence[LedgerRow], budget: float | None) -> Markup:
    """Each hospital's cumulative ε per round, with the job's per-hospital budget as a line."""

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        for hospital in sorted({row.hospital for row in ledger}):
            points = [(row.round, row.epsilon) for row in ledger if row.hospital == hospital]
            ax.plot(*zip(*points, strict=True), marker="o", label=hospital)
        if budget is not None:
            ax.axhline(budget, linestyle="--", color="black", label=f"budget ε = {budget:g}")
        ax.set_ylim(bottom=0.0)
        _finish_axes(ax, title="Privacy spent per hospital", ylabel="ε (cumulative)")

    return _svg(draw, "epsilon")


# -- pages ----------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def _path(*parts: object) -> str:
    """A URL path from segments, each quoted whole (job names may hold any character)."""
    return "/" + "/".join(quote(str(p), safe="") for p in parts)


def _by_status(parts: Sequence[Participation]) -> dict[str, list[Participation]]:
    out: dict[str, list[Participation]] = {"ok": [], "refused": [], "rejected": [], "failed": []}
    for p in sorted(parts, key=lambda p: p.hospital):
        out[p.status].append(p)
    return out


def _latest_per_hospital(ledger: Sequence[LedgerRow]) -> list[LedgerRow]:
    latest = {row.hospital: row for row in ledger}  # rows come by round, then hospital
    return [latest[h] for h in sorted(latest)]


def _budget(job: Job) -> float | None:
    privacy = job.config.get("privacy")
    epsilon = privacy.get("epsilon") if isinstance(privacy, Mapping) else None
    return float(epsilon) if isinstance(epsilon, int | float) else None


class Dashboard:
    """The pages, independent of HTTP: a verified caller and a path in, a :class:`Response` out.

    Parameters
    ----------
    store
        The round store to read (and to append refusals to).
    ca_cert
        The consortium CA: a caller's certificate must be issued by it.
    consortium
        The consortium's name, shown in the page header.
    """

    _ROUTES: ClassVar[tuple[tuple[re.Pattern[str], str], ...]] = (
        (re.compile(r"/"), "_jobs_page"),
        (re.compile(r"/jobs/(?P<job>[^/]+)"), "_job_page"),
        (re.compile(r"/jobs/(?P<job>[^/]+)/rounds/(?P<number>[0-9]{1,9})"), "_round_page"),
        (re.compile(r"/audit"), "_audit_page"),
        (re.compile(r"/static/dashboard\.css"), "_css"),
    )

    def __init__(self, store: RoundStore, ca_cert: x509.Certificate, *, consortium: str) -> None:
        self._store = store
        self._ca = ca_cert
        self._consortium = consortium
        self._api = OperatorServicer(store)
        self._env = Environment(
            loader=FileSystemLoader(_ASSETS),
            autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._env.filters["num"] = _num
        self._env.globals["path"] = _path

    # -- authentication and access ------------------------------------------------------

    def authenticate(self, der: bytes | None, path: str) -> Caller:
        """The caller of a request, from the DER client certificate TLS verified.

        Raises
        ------
        _PageError
            403: no certificate, not the consortium CA's, or one without an operator role
            (a hospital's, the coordinator's); the refusal is audited.
        """
        if not der:  # TLS requires a certificate; refuse should one ever slip through
            self._refuse(path, "", None, "no client certificate was presented")
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            self._refuse(path, "", None, "the client certificate does not parse")
        cn = common_name(cert)
        try:
            verify_issued_by(cert, self._ca)
            return Caller(cn, role_from_certificate(cert))
        except InvalidConfigError as exc:
            self._refuse(path, cn, None, str(exc))

    def may(self, caller: Caller, method: str) -> bool:
        """Whether ``caller``'s role may call operator method ``method`` (unknown: no)."""
        rule = ACCESS.get(method)
        return rule is not None and caller.role.allows(rule.required)

    def _require(self, caller: Caller, method: str, path: str) -> None:
        if self.may(caller, method):
            return
        rule = ACCESS.get(method) or Rule(Role.ADMIN, method)
        message = (
            f"role {caller.role.value} may not {rule.description} "
            f"(requires {rule.required.value} or above)"
        )
        self._refuse(path, caller.common_name, caller.role, message, method, rule.required)

    def _refuse(
        self,
        path: str,
        cn: str,
        role: Role | None,
        message: str,
        method: str = "",
        required: Role | None = None,
    ) -> NoReturn:
        detail: dict[str, Any] = {"via": "dashboard", "path": path[:200], "method": method}
        detail["role"] = None if role is None else role.value
        if role is None:
            detail["reason"] = message
        try:
            event = AuditEvent(kind="operator_denied", actor=cn or "<unknown>", detail=detail)
            self._store.append_audit(event)
        except FedvaultError as exc:  # still refuse: a full disk must not open the door
            _log.error("could not audit a denied dashboard page %s by %r: %s", path, cn, exc)
        raise _PageError(HTTPStatus.FORBIDDEN, message, required)

    # -- dispatch -----------------------------------------------------------------------

    def handle(self, caller: Caller, target: str) -> Response:
        """Answer ``GET target`` for ``caller``; errors become their status page."""
        parts = urlsplit(target)
        try:
            for pattern, name in self._ROUTES:
                match = pattern.fullmatch(parts.path)
                if match:
                    args = {k: unquote(v) for k, v in match.groupdict().items()}
                    page: Callable[..., Response] = getattr(self, name)
                    return page(caller, parts.path, parse_qs(parts.query), **args)
            raise _PageError(HTTPStatus.NOT_FOUND, f"there is no page {parts.path}")
        except _PageError as exc:
            return self.error(exc.status, str(exc), caller=caller, required=exc.required)

    def error(
        self,
        status: HTTPStatus,
        message: str,
        *,
        caller: Caller | None = None,
        required: Role | None = None,
    ) -> Response:
        """A status page (403 names the role required, in the page and a header)."""
        headers = {} if required is None else {REQUIRED_ROLE_HEADER: required.value}
        body = self._render(
            "error.html",
            caller,
            title=f"{status.value} {status.phrase}",
            status=status,
            message=message,
            required_role=required,
        )
        return Response(status, body, headers=headers)

    def _render(self, template: str, caller: Caller | None, **context: Any) -> bytes:
        def may(method: str) -> bool:
            return caller is not None and self.may(caller, method)

        def required(method: str) -> str:
            rule = ACCESS.get(method)
            return rule.required.value if rule is not None else Role.ADMIN.value

        page = self._env.get_template(template).render(
            caller=caller,
            consortium=self._consortium,
            may=may,
            required=required,
            **context,
        )
        return page.encode("utf-8")

    def _job(self, name: str) -> Job:
        job = self._store.get_job(name)
        if job is None:
            raise _PageError(HTTPStatus.NOT_FOUND, f"there is no job {name!r} in the round store")
        return job

    def _status(self, job: Job) -> admin_pb2.JobStatus:
        # The operator API's own answer, so a page shows exactly what GetJobStatus shows.
        return self._api.GetJobStatus(admin_pb2.GetJobStatusRequest(job=job.name), None)

    # -- the pages ----------------------------------------------------------------------

    def _jobs_page(self, caller: Caller, path: str, query: object) -> Response:
        self._require(caller, "GetJobStatus", path)
        jobs = [self._status(job) for job in reversed(self._store.list_jobs())]
        return Response(HTTPStatus.OK, self._render("jobs.html", caller, title="Jobs", jobs=jobs))

    def _job_page(self, caller: Caller, path: str, query: object, *, job: str) -> Response:
        self._require(caller, "GetJobStatus", path)
        row = self._job(job)
        context: dict[str, Any] = {"status": self._status(row), "job": row.name}
        if self.may(caller, "ListRounds"):
            rounds = self._store.rounds(row.id)
            context["rounds"] = [(r, _by_status(r.participations)) for r in rounds]
            context["metrics_chart"] = metrics_chart(rounds) if rounds else None
        if self.may(caller, "GetPrivacyLedger"):
            ledger = self._store.ledger(row.id)
            context["ledger"] = ledger
            context["latest"] = _latest_per_hospital(ledger)
            context["budget"] = _budget(row)
            context["epsilon_chart"] = epsilon_chart(ledger, _budget(row)) if ledger else None
        body = self._render("job.html", caller, title=f"Job {row.name}", **context)
        return Response(HTTPStatus.OK, body)

    def _round_page(
        self, caller: Caller, path: str, query: object, *, job: str, number: str
    ) -> Response:
        self._require(caller, "ListParticipants", path)
        row = self._job(job)
        attempts = [r for r in self._store.rounds(row.id) if r.number == int(number)]
        if not attempts:
            raise _PageError(HTTPStatus.NOT_FOUND, f"job {row.name!r} has no round {number} yet")
        body = self._render(
            "round.html",
            caller,
            title=f"Job {row.name}, round {number}",
            job=row.name,
            number=int(number),
            attempts=[(r, _by_status(r.participations)) for r in attempts],
        )
        return Response(HTTPStatus.OK, body)

    def _audit_page(self, caller: Caller, path: str, query: dict[str, list[str]]) -> Response:
        self._require(caller, "GetAuditLog", path)
        job = (query.get("job") or [""])[0]
        if job:
            self._job(job)
        log = self._api.GetAuditLog(
            admin_pb2.GetAuditLogRequest(job=job, limit=_AUDIT_EVENTS), None
        )
        events = [(e, _short_detail(e.detail_json)) for e in reversed(log.events)]
        title = f"Audit log of job {job}" if job else "Audit log"
        body = self._render("audit.html", caller, title=title, log=log, events=events, job=job)
        return Response(HTTPStatus.OK, body)

    def _css(self, caller: Caller, path: str, query: object) -> Response:
        css = (_ASSETS / "dashboard.css").read_bytes()
        return Response(HTTPStatus.OK, css, content_type="text/css; charset=utf-8")


def _short_detail(detail_json: str) -> str:
    text = json.dumps(json.loads(detail_json or "{}"), sort_keys=True, ensure_ascii=False)
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"


# -- HTTP over mutual TLS -------------------------------------------------------------------


def _tls_context(kit: Kit) -> ssl.SSLContext:
    """Server TLS with the coordinator's certificate; clients must present a CA-issued one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=kit.read("ca.pem").decode("ascii"))
    ctx.load_cert_chain(kit.cert_path, kit.key_path)
    return ctx


class _Handler(BaseHTTPRequestHandler):
    """GET and HEAD through :class:`Dashboard`; every other method 405."""

    server: _TLSServer
    server_version = "fedvault-dashboard"
    sys_version = ""  # no Python version in the Server header
    protocol_version = "HTTP/1.1"
    timeout = _REQUEST_TIMEOUT_S

    def do_GET(self) -> None:
        """Serve a page."""
        self._send(self._answer(), body=True)

    def do_HEAD(self) -> None:
        """Serve a page's headers only."""
        self._send(self._answer(), body=False)

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD>; any method but GET and HEAD is not allowed.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        message = f"the dashboard is read-only: {self.command} is not allowed, only GET and HEAD"
        answer = self.server.dashboard.error(HTTPStatus.METHOD_NOT_ALLOWED, message)
        self._send(answer, body=True, extra={"Allow": "GET, HEAD"})

    def _answer(self) -> Response:
        board = self.server.dashboard
        try:
            der = self.connection.getpeercert(binary_form=True)  # type: ignore[attr-defined]
            caller = board.authenticate(der, self.path)
            return board.handle(caller, self.path)
        except _PageError as exc:
            return board.error(exc.status, str(exc), required=exc.required)
        except FedvaultError as exc:  # the store is unreachable, say
            _log.error("dashboard %s: %s", self.path, exc)
            return board.error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
        except Exception:  # a bug: answer 500 (with no detail) rather than drop the connection
            _log.exception("dashboard: error serving %s", self.path)
            message = "the dashboard failed to render this page; the coordinator's log says why"
            return board.error(HTTPStatus.INTERNAL_SERVER_ERROR, message)

    def _send(
        self, answer: Response, *, body: bool, extra: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(answer.status)
        headers = {**_SECURITY_HEADERS, **answer.headers, **(extra or {})}
        headers["Content-Type"] = answer.content_type
        headers["Content-Length"] = str(len(answer.body))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log, not stderr."""
        _log.debug("dashboard %s: " + format, self.address_string(), *args)


class _TLSServer(ThreadingHTTPServer):
    """A threading HTTP server whose connections are TLS, handshaken in their own thread."""

    daemon_threads = True
    allow_reuse_address = False  # a second coordinator on the same port must fail

    def __init__(
        self, address: tuple[str, int], context: ssl.SSLContext, dashboard: Dashboard
    ) -> None:
        self.context = context
        self.dashboard = dashboard
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handshake (client certificate required), then serve; a refused handshake ends here."""
        request.settimeout(_HANDSHAKE_TIMEOUT_S)
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            _log.info("dashboard: TLS handshake with %s refused: %s", client_address[0], exc)
            return
        try:
            conn.settimeout(_REQUEST_TIMEOUT_S)
            _Handler(conn, client_address, self)
        except (ssl.SSLError, OSError) as exc:
            _log.debug("dashboard: connection from %s ended: %s", client_address[0], exc)
        finally:
            conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Log a failed request with its traceback, not on stderr."""
        _log.exception("dashboard: error serving %s", client_address[0])


class DashboardServer:
    """A running dashboard; :meth:`stop` ends it and closes its store."""

    def __init__(self, server: _TLSServer, store: RoundStore) -> None:
        self._server = server
        self._store = store
        self._thread = threading.Thread(
            target=server.serve_forever, name="dashboard", kwargs={"poll_interval": 0.2}
        )
        self._thread.daemon = True
        self._thread.start()

    @property
    def address(self) -> str:
        """``host:port`` the dashboard listens on."""
        host, port = self._server.server_address[:2]
        return f"{host!s}:{port}"

    @property
    def url(self) -> str:
        """The dashboard's URL."""
        return f"https://{self.address}/"

    def stop(self) -> None:
        """Stop serving, wait for the serving loop, close the listening socket and store."""
        self._server.shutdown()
        self._thread.join(5)
        self._server.server_close()
        self._store.close()


def serve_dashboard(
    store_url: str, kit: Kit, *, port: int = 0, host: str | None = None
) -> DashboardServer:
    """Serve the dashboard on ``host`` (default: the operator API's) and ``port`` (0: any).

    Raises
    ------
    InvalidConfigError
        ``kit`` is not the coordinator's, or the address cannot be bound.
    StoreError
        The round store cannot be opened.
    """
    require_coordinator_kit(kit, "the dashboard")
    bind = host or kit.operator_api_address.rpartition(":")[0].strip("[]")
    context = _tls_context(kit)
    store = RoundStore(store_url, at_rest_key=kit.at_rest_key())
    dashboard = Dashboard(store, kit.ca_cert, consortium=kit.consortium)
    try:
        server = _TLSServer((bind, port), context, dashboard)
    except OSError as exc:
        store.close()
        raise InvalidConfigError(
            f"cannot bind the dashboard to {bind}:{port} ({exc.strerror or exc}): stop the other "
            "process or choose another --dashboard-port"
        ) from None
    board = DashboardServer(server, store)
    _log.info("dashboard on %s", board.url)
    return board
