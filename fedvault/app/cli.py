"""The ``fedvault`` command line (Typer). Commands and flags are a contract: see docs/design.md.

Exit codes: 0 done; 1 the work ran and failed (a job that failed, an audit
that refutes the claim); 2 bad input (an option, a file or directory, a kit, a
task): one line ``error: ...`` on stderr, before anything is half-written.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedvault.errors import FedvaultError

if TYPE_CHECKING:  # imported where used: the CLI starts without the store's stack
    from fedvault.coordinator.report import Report

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Federated learning for hospital consortia: DP-SGD + encrypted (BFV) aggregation.",
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated learning for hospital consortia: DP-SGD + encrypted (BFV) aggregation."""


def _exit_code(exc: FedvaultError) -> int:
    """1 when the work ran and failed (a job, a daemon's child, a peer); 2 for bad input."""
    from fedvault.coordinator.superlink import ControlApiError
    from fedvault.errors import BudgetExhaustedError, MalformedUpdateError
    from fedvault.flower_env import FlowerProcessError

    failed = (BudgetExhaustedError, MalformedUpdateError, FlowerProcessError, ControlApiError)
    return 1 if type(exc) is FedvaultError or isinstance(exc, failed) else 2


def _error(message: str, code: int) -> None:
    """``error: MESSAGE`` on stderr, unwrapped; bad input (code 2) on exactly one line.

    Work that failed (code 1) may keep its lines: a child's log tail, say.
    """
    from rich.markup import escape

    text = " ".join(message.split()) if code == 2 else message
    err.print(f"[bold red]error:[/bold red] {escape(text)}", highlight=False, soft_wrap=True)


def _fail(exc: FedvaultError) -> None:
    code = _exit_code(exc)
    _error(str(exc), code)
    raise typer.Exit(code=code)


def print_json(obj: object) -> None:
    """``--json`` output: ``obj`` as one JSON document on stdout (keys as given)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


_Json = Annotated[
    bool, typer.Option("--json", help="machine-readable JSON on stdout instead of tables")
]


#: The metrics a summary table shows per round, most familiar first (the final line and
#: report.json have them all), with short column headings.
_TABLE_METRICS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "bal. acc",
    "auroc": "auroc",
    "auroc_macro": "auroc",
    "f1": "f1",
    "f1_macro": "f1",
    "rmse": "rmse",
    "mae": "mae",
    "r2": "r²",
}


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def print_summary(report: Report, console: Console, out_dir: Path) -> None:
    """The readable end of a run: per-round pooled metrics, per-hospital privacy spend."""
    present = {k for r in report.rounds for k in r.metrics}
    if not present and any(r.accuracy is not None for r in report.rounds):
        present = {"accuracy"}
    names = [k for k in _TABLE_METRICS if k in present][:3]
    rounds = Table(title="Rounds (test metrics pooled over hospitals)", show_lines=False)
    for col in ("round", *(_TABLE_METRICS[n] for n in names), "loss", "max ε", "participants"):
        rounds.add_column(col, justify="right")
    rounds.add_column("bytes received", justify="right")
    for r in report.rounds:
        eps = max(r.epsilon.values(), default=0.0)
        metrics = {"accuracy": r.accuracy, **r.metrics}
        loss = r.loss if r.loss is not None else metrics.get("loss")
        rounds.add_row(
            str(r.round),
            *("n/a" if metrics.get(n) is None else f"{metrics[n]:.4f}" for n in names),
            "n/a" if loss is None else f"{loss:.4f}",
            f"{eps:.3f}",
            str(len(r.participants)),
            f"{r.bytes_received:,}",
        )
    hospitals = Table(title="Hospitals (privacy spent in this job)")
    for col in ("hospital", "samples", "ε", "noise σ", "sample rate", "DP steps", "accountant"):
        hospitals.add_column(col, justify="right")
    # A hospital that never trained (refused, dropped) has no ledger entry: its cells are n/a.
    for name, h in sorted(report.hospitals.items()):
        hospitals.add_row(
            name,
            _num(h.samples, "d"),
            _num(h.epsilon, ".3f"),
            _num(h.noise_multiplier, ".3f"),
            _num(h.sample_rate, ".4f"),
            _num(h.steps, "d"),
            h.accountant or "n/a",
        )
    console.print(rounds)
    console.print(hospitals)
    final = report.final
    shown: dict[str, float | None] = {**final.metrics} or {"accuracy": final.accuracy}
    order = sorted(k for k in shown if k != "loss")
    order.sort(key=lambda k: k != "accuracy")  # the familiar one first
    values = "   ".join(f"[bold]{k}[/bold] {_num(shown[k], '.4f')}" for k in order)
    console.print(
        f"[bold]final[/bold] {values}   "
        f"[bold]max ε[/bold] {_num(final.epsilon_max, '.3f')} "
        f"at δ={_num(final.delta, 'g')}   "
        f"[bold]rounds[/bold] {final.rounds_completed}   status {final.status}"
    )
    console.print(f"report: {out_dir / 'report.json'}  plot: {out_dir / 'report.png'}")


#: ``simulate``'s source of DP noise (deployed hospitals always use the CSPRNG).
_Masking = Annotated[
    bool,
    typer.Option(
        "--masking/--no-masking",
        help="he mode: SecAgg+ masks inside the encryption (docs/secagg.md); off to compare",
    ),
]
_SecureRng = Annotated[
    bool,
    typer.Option(
        "--secure-rng/--fast-rng",
        help="DP noise and Poisson sampling from a CSPRNG (ChaCha20), as deployed hospitals "
        "draw them, or from torch's generator seeded by --seed (faster, reproducible)",
    ),
]


_GpusOpt = Annotated[
    float, typer.Option(help="GPUs (a fraction shares one) Ray gives each virtual hospital")
]
_MlflowOpt = Annotated[
    str | None,
    typer.Option(
        "--mlflow",
        metavar="URI",
        help="also log the job to MLflow at this tracking URI (file:DIR, sqlite:///PATH, "
        "http://HOST:5000); needs `pip install 'fedvault\\[mlflow]'`",
    ),
]
_RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        metavar="HOST:PORT",
        help="join this running Ray cluster (its head's address, or auto) instead of "
        "starting Ray here; every node needs fedvault and must reach --out",
    ),
]


@app.command()
def simulate(
    task: Annotated[
        str | None,
        typer.Option(help="task: an installed task's name or MODULE:ATTR (default breast-cancer)"),
    ] = None,
    example: Annotated[
        str | None,
        typer.Option(help="a built-in task by name: breast-cancer | digits | diabetes | imaging"),
    ] = None,
    hospitals: Annotated[int, typer.Option(help="number of virtual hospitals")] = 3,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 10,
    partition: Annotated[str, typer.Option(help="iid | dirichlet:ALPHA")] = "iid",
    secure_aggregation: Annotated[str, typer.Option(help="he (BFV, encrypted) | none")] = "he",
    epsilon: Annotated[float, typer.Option(help="ε budget per hospital for the job")] = 3.0,
    delta: Annotated[float, typer.Option(help="δ of the (ε, δ) guarantee")] = 1e-5,
    seed: Annotated[int, typer.Option(help="seeds data split, partition, init, noise")] = 0,
    out: Annotated[Path, typer.Option(help="output directory (report, plot, store)")] = Path(
        "fedvault-out"
    ),
    store: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL of the round store (default: SQLite in --out)"),
    ] = None,
    job: Annotated[
        str | None, typer.Option(help="job name (default: derived from settings)")
    ] = None,
    gpus_per_hospital: _GpusOpt = 0.0,
    secure_rng: _SecureRng = False,
    masking: _Masking = True,
    mlflow: _MlflowOpt = None,
    ray_address: _RayAddressOpt = None,
) -> None:
    """Simulate virtual hospitals with the production apps; OUT: report, plot, model/, store."""
    try:
        from fedvault.app.simulation import noise_source
        from fedvault.app.simulation import simulate as run
        from fedvault.config import JobConfig
        from fedvault.coordinator.report import Report
        from fedvault.errors import InvalidConfigError
        from fedvault.task_registry import load_task

        if task is not None and example is not None:
            raise InvalidConfigError("give --task or --example, not both")
        reference = task or example or "breast-cancer"
        loaded = load_task(reference)
        config = JobConfig.for_task(
            loaded.task,
            reference=reference,
            hospitals=hospitals,
            rounds=rounds,
            epsilon=epsilon,
            delta=delta,
            partition=partition,
            secure_aggregation=secure_aggregation,
            seed=seed,
            job=job,
            masking=masking,
        )
        console = Console()
        report = Report.from_json(
            run(
                config,
                task=loaded.task,
                out_dir=out,
                store_url=store,
                console=console,
                gpus_per_hospital=gpus_per_hospital,
                secure_rng=secure_rng,
                mlflow_uri=mlflow,
                ray_address=ray_address,
            )
        )
        print_summary(report, console, out.resolve())
        console.print(f"DP noise and sampling: {noise_source(secure_rng)}")
    except FedvaultError as exc:
        _fail(exc)
    if report.final.status != "finished":
        raise typer.Exit(code=1)


coordinator_app = typer.Typer(no_args_is_help=True, help="The consortium operator's daemon.")
client_app = typer.Typer(no_args_is_help=True, help="A hospital's daemon.")
audit_app = typer.Typer(
    no_args_is_help=True,
    help="Audits: the tamper-evident audit log, and an empirical test of the privacy claim.",
)
model_app = typer.Typer(no_args_is_help=True, help="Trained model versions: list and export.")
task_app = typer.Typer(no_args_is_help=True, help="Installed tasks and their fingerprints.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(client_app, name="client")
app.add_typer(audit_app, name="audit")
app.add_typer(model_app, name="model")
app.add_typer(task_app, name="task")
job_app = typer.Typer(
    no_args_is_help=True,
    help="The coordinator service's jobs: submit, list, stop, resume (operator API).",
)
app.add_typer(job_app, name="job")


class LogFormat(StrEnum):
    """A daemon's log records: one plain line or one JSON object per record."""

    TEXT = "text"
    JSON = "json"


_LogFormatOpt = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        help="text: one line per record (rich on a terminal); json: one object per line "
        "with ts, level, logger, message, job, round, hospital",
    ),
]
_MetricsPortOpt = Annotated[
    int | None,
    typer.Option(
        help="serve Prometheus metrics on this port (http://HOST:PORT/metrics); off when not given"
    ),
]
_MetricsHostOpt = Annotated[
    str, typer.Option(help="address the metrics port listens on (0.0.0.0: every interface)")
]


def _daemon_logging(log_format: LogFormat = LogFormat.TEXT, **context: object) -> None:
    from fedvault.logs import configure_logging

    configure_logging(log_format.value, context=context)


def _kit_party(kit: Path) -> str | None:
    """The party a kit belongs to, for log lines; ``None`` if it does not load (refused later)."""
    from fedvault.kit import Kit

    try:
        return Kit.load(kit).party
    except (FedvaultError, OSError, ValueError):
        return None


@app.command()
def provision(
    consortium: Annotated[
        Path, typer.Argument(help="consortium TOML (see examples/consortium.toml)")
    ],
    out: Annotated[Path, typer.Option(help="new, empty directory for the CA and every kit")],
) -> None:
    """Create the consortium CA, the coordinator's, hospitals' and operators' kits."""
    try:
        from fedvault.app.provision import provision as run

        result = run(consortium, out)
    except FedvaultError as exc:
        _fail(exc)
    console = Console()
    console.print(f"provisioned [bold]{result.config.name}[/bold] in {result.out_dir}")
    console.print(f"  CA fingerprint (pin it): {result.ca_sha256}")
    console.print(f"  coordinator kit: {result.coordinator_kit}")
    for name, path in sorted(result.hospital_kits.items()):
        console.print(f"  hospital kit {name}: {path}")
    for name, path in sorted(result.operator_kits.items()):
        console.print(f"  operator kit {name}: {path}")
    console.print(
        "[yellow]ca/ca.key stays with the provisioner; give each party only its own kit.[/yellow]"
    )


@coordinator_app.command("start")
def coordinator_start(
    kit: Annotated[Path, typer.Option(help="the coordinator's kit directory")],
    job: Annotated[
        Path | None,
        typer.Option(
            help="a job TOML (\\[job] name, task, hospitals, rounds, epsilon, ...) to queue at "
            "start, as `fedvault job submit` does"
        ),
    ] = None,
    state: Annotated[
        Path, typer.Option(help="state directory (SuperLink db, keys, report)")
    ] = Path("fedvault-coordinator"),
    store: Annotated[
        str | None, typer.Option(help="round store URL (default: SQLite in --state)")
    ] = None,
    log_format: _LogFormatOpt = LogFormat.TEXT,
    exit_when_idle: Annotated[
        bool,
        typer.Option(
            "--exit-when-idle",
            help="exit once no job is queued or running, with the last job's status "
            "(scripts); by default the coordinator serves until stopped",
        ),
    ] = False,
    metrics_port: _MetricsPortOpt = None,
    metrics_host: _MetricsHostOpt = "127.0.0.1",
    mlflow: _MlflowOpt = None,
    dashboard_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="serve the read-only web dashboard on this port of the operator API's host "
            "(mutual TLS: open it with an operator certificate; 0: any free port)",
        ),
    ] = None,
) -> None:
    """Start the SuperLink (TLS, node auth), enrol hospitals, serve the operator API and jobs.

    Runs the submitted jobs one after another until stopped (SIGTERM);
    --exit-when-idle ends it once the queue is empty, with the last job's status.
    """
    import threading

    from fedvault.coordinator.daemon import (
        CoordinatorOptions,
        install_signal_handlers,
        run_coordinator,
    )

    _daemon_logging(log_format)
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        if mlflow:
            from fedvault.coordinator.tracking import require_mlflow

            require_mlflow()  # a missing extra fails now, before any process starts
        status = run_coordinator(
            CoordinatorOptions(
                kit_dir=kit,
                job_file=job,
                state_dir=state,
                store_url=store,
                exit_when_idle=exit_when_idle,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                mlflow_uri=mlflow,
                dashboard_port=dashboard_port,
            ),
            stop=stop,
        )
    except FedvaultError as exc:
        _fail(exc)
    if stop.is_set():  # SIGTERM: the service's normal end; a running job resumes next start
        err.print(f"coordinator stopped (last job: {status or 'none'})")
        return
    err.print(f"job ended: {status or 'no job was queued'}")
    if status not in ("finished", "stopped", ""):
        raise typer.Exit(code=1)


@coordinator_app.command("rekey")
def coordinator_rekey(
    state: Annotated[Path, typer.Option(help="the coordinator's state directory")] = Path(
        "fedvault-coordinator"
    ),
) -> None:
    """Start a new HE key epoch (e.g. after a hospital left); applies at the next start."""
    from fedvault.coordinator.key_ceremony import KeyDirectory

    epoch = KeyDirectory(state / "keys").bump_epoch()
    Console().print(
        f"key epoch is now {epoch}: restart the coordinator; the custodian will generate a new "
        "HE key and updates under older epochs will be refused"
    )


@client_app.command("start")
def client_start(
    kit: Annotated[Path, typer.Option(help="this hospital's kit directory")],
    data: Annotated[
        Path, typer.Option(help="data spec TOML (see examples/hospital-data/README.md)")
    ],
    state: Annotated[Path, typer.Option(help="state directory (ledger, HE keys)")] = Path(
        "fedvault-hospital"
    ),
    epsilon_budget: Annotated[
        float | None, typer.Option(help="this hospital's own ε cap over all jobs")
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (a GPU when present) | cpu | cuda | cuda:N")
    ] = "auto",
    max_physical_batch: Annotated[
        int | None,
        typer.Option(
            help="most records per forward/backward pass (memory); larger DP-SGD batches "
            "run as virtual steps with the same ε"
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="site policy TOML: the tasks and limits this hospital allows "
            "(default STATE/policy.toml; none: nothing is allowed)"
        ),
    ] = None,
    log_format: _LogFormatOpt = LogFormat.TEXT,
    metrics_port: _MetricsPortOpt = None,
    metrics_host: _MetricsHostOpt = "127.0.0.1",
) -> None:
    """Validate the hospital's data, then run its SuperNode (outbound only) until stopped."""
    import threading

    from fedvault.client.daemon import ClientOptions, run_client
    from fedvault.coordinator.daemon import install_signal_handlers

    _daemon_logging(log_format, hospital=_kit_party(kit))
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        run_client(
            ClientOptions(
                kit_dir=kit,
                data=data,
                state_dir=state,
                epsilon_budget=epsilon_budget,
                policy=policy,
                device=device,
                max_physical_batch=max_physical_batch,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
            ),
            stop=stop,
        )
    except FedvaultError as exc:
        _fail(exc)


@app.command()
def status(
    kit: Annotated[Path, typer.Option(help="an operator kit")],
    job: Annotated[str, typer.Option(help="job name (default: the latest)")] = "",
    as_json: _Json = False,
) -> None:
    """Job status, rounds, privacy ledger and audit log, as far as your role allows."""
    try:
        from fedvault.app.operator_client import OperatorClient
        from fedvault.app.status_view import read_status, render_status, status_json
        from fedvault.kit import Kit

        with OperatorClient(Kit.load(kit)) as client:
            if as_json:
                print_json(status_json(read_status(client, job=job)))
            else:
                render_status(client, Console(), job=job)
    except FedvaultError as exc:
        _fail(exc)


_OperatorKit = Annotated[Path, typer.Option(help="an operator kit (as `fedvault status`)")]
_Reason = Annotated[str, typer.Option(help="why, kept in the audit trail")]


@job_app.command("submit")
def job_submit(
    file: Annotated[
        Path, typer.Argument(help="job TOML (\\[job] name, task, hospitals, rounds, ...)")
    ],
    kit: _OperatorKit,
    reason: _Reason = "",
) -> None:
    """Queue a job on the running coordinator (engineer and above); it runs after the others."""
    try:
        from fedvault.app.operator_client import OperatorClient
        from fedvault.errors import InvalidConfigError
        from fedvault.kit import Kit

        try:
            text = file.read_text()
        except OSError as exc:
            raise InvalidConfigError(f"cannot read job file {file}: {exc.strerror}") from None
        with OperatorClient(Kit.load(kit)) as client:
            entry = client.submit_job(text, reason=reason)
    except FedvaultError as exc:
        _fail(exc)
    where = f"position {entry.queue_position}" if entry.queue_position else entry.status
    Console().print(f"job {entry.job} {entry.status} ({where} in the queue)")


@job_app.command("list")
def job_list(kit: _OperatorKit, as_json: _Json = False) -> None:
    """Every job, its place in the queue, and each hospital's ε per job and in total."""
    try:
        from fedvault.app.job_view import jobs_json, render_jobs
        from fedvault.app.operator_client import OperatorClient
        from fedvault.kit import Kit

        with OperatorClient(Kit.load(kit)) as client:
            jobs = client.list_jobs()
    except FedvaultError as exc:
        _fail(exc)
    if as_json:
        print_json(jobs_json(jobs))
    else:
        render_jobs(jobs, Console())


@job_app.command("stop")
def job_stop(
    name: Annotated[str, typer.Argument(help="the job")], kit: _OperatorKit, reason: _Reason = ""
) -> None:
    """Stop a queued job, or a running one now (engineer and above); `job resume` requeues it."""
    _job_control(kit, "stop", name, reason)


@job_app.command("resume")
def job_resume(
    name: Annotated[str, typer.Argument(help="the job")], kit: _OperatorKit, reason: _Reason = ""
) -> None:
    """Queue a stopped or failed job again (it resumes after its last committed round)."""
    _job_control(kit, "resume", name, reason)


def _job_control(kit: Path, action: str, name: str, reason: str) -> None:
    try:
        from fedvault.app.operator_client import OperatorClient
        from fedvault.kit import Kit

        with OperatorClient(Kit.load(kit)) as client:
            control = client.stop_job if action == "stop" else client.resume_job
            done = control(name, reason=reason)
    except FedvaultError as exc:
        _fail(exc)
    Console().print(f"job {done.job}: {done.status}")


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="new directory to keep everything in")] = None,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 10,
    masking: Annotated[
        bool, typer.Option(help="mask updates inside the encryption (SecAgg+; the default)")
    ] = True,
) -> None:
    """A 3-hospital consortium as real processes on 127.0.0.1, end to end."""
    try:
        from fedvault.app.demo import run_demo
        from fedvault.coordinator.report import Report

        console = Console()
        raw = run_demo(out, console, rounds=rounds, masking=masking)
        report = Report.from_json(raw)
        print_summary(report, console, Path(str(raw.get("out_dir", out or "."))))
    except FedvaultError as exc:
        _fail(exc)
    if report.final.status != "finished":
        raise typer.Exit(code=1)


@audit_app.command("verify")
def audit_verify(
    store: Annotated[
        str, typer.Option(help="round store URL")
    ] = "sqlite:///fedvault-out/fedvault.sqlite",
) -> None:
    """Re-walk the audit hash chain; name the first broken link."""
    try:
        from fedvault.coordinator.store import RoundStore

        with RoundStore(store) as rs:
            broken = rs.verify_audit_chain()
            count = len(rs.audit_events())
    except FedvaultError as exc:
        _fail(exc)
    if broken is None:
        Console().print(f"audit chain intact: {count} events")
        return
    err.print(
        f"[bold red]audit chain broken at event id {broken}[/bold red]: "
        "it or its predecessor was altered"
    )
    raise typer.Exit(code=1)


@audit_app.command("privacy")
def audit_privacy(
    task: Annotated[
        str, typer.Option(help="an installed task's name or MODULE:ATTR (classification)")
    ] = "breast-cancer",
    epsilon: Annotated[float, typer.Option(help="ε budget of the audited job")] = 3.0,
    delta: Annotated[float, typer.Option(help="δ of the (ε, δ) guarantee")] = 1e-5,
    rounds: Annotated[int, typer.Option(help="federated rounds of the audited job")] = 10,
    canaries: Annotated[
        int, typer.Option(help="canaries drawn, each included with p = 1/2")
    ] = 1000,
    confidence: Annotated[float, typer.Option(help="confidence of the lower bound")] = 0.95,
    seed: Annotated[
        int, typer.Option(help="seeds the canaries, their coins and the model (not the DP noise)")
    ] = 0,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="train without noise (clipping kept): must fail")
    ] = False,
    noise_scale: Annotated[
        float, typer.Option(help="multiply the planned noise (e.g. 0.01: far below the plan)")
    ] = 1.0,
    out: Annotated[Path, typer.Option(help="directory for privacy-audit.json and .png")] = Path(
        "fedvault-audit"
    ),
) -> None:
    """Test the accountant's ε on a trained model: canaries, membership inference, a lower bound.

    One-run auditing (Steinke, Nasr and Jagielski, NeurIPS 2023). Exit 0 when the
    empirical lower bound stays at or below the accountant's ε, 1 when it exceeds it.
    """
    try:
        from fedvault.app.audit import AuditSettings, run_privacy_audit

        settings = AuditSettings(
            task=task,
            epsilon=epsilon,
            delta=delta,
            rounds=rounds,
            canaries=canaries,
            confidence=confidence,
            seed=seed,
            dp=not no_dp,
            noise_scale=noise_scale,
        )
        result = run_privacy_audit(settings, out)
    except FedvaultError as exc:
        _fail(exc)
    mode = (
        "DP off" if no_dp else "DP-SGD" + ("" if noise_scale == 1 else f", noise × {noise_scale:g}")
    )
    table = Table(title=f"Privacy audit: {result.task}, {mode}")
    for col in ("accountant ε", "lower bound", "confidence", "canaries", "guesses", "correct"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{result.claimed_epsilon:.3f}",
        f"{result.lower_bound:.3f}",
        f"{result.confidence:.0%}",
        f"{result.canaries} ({result.included} in)",
        str(result.guesses),
        str(result.correct),
    )
    console = Console()
    console.print(table)
    console.print(
        f"noise σ {result.noise_multiplier:.3g} (planned {result.planned_noise_multiplier:.3g}), "
        f"sample rate {result.sample_rate:.4g}, {result.steps} DP steps, δ = {result.delta:g}, "
        f"{result.wall_s:.1f} s"
    )
    verdict = (
        "[green]the claim holds[/green]: the lower bound stays at or below the accountant's ε"
        if result.holds
        else "[bold red]the claim is refuted[/bold red]: the lower bound exceeds the accountant's ε"
    )
    console.print(verdict)
    console.print(f"result: {out.resolve() / 'privacy-audit.json'}")
    if not result.holds:
        raise typer.Exit(code=1)


_StoreOpt = Annotated[
    str | None,
    typer.Option(help="coordinator side: the round store URL (plaintext jobs only)"),
]
_KitOpt = Annotated[
    Path | None,
    typer.Option(help="a hospital's kit (with --state) or the coordinator's (with --store)"),
]
_StateOpt = Annotated[
    Path | None, typer.Option(help="hospital side: the hospital daemon's state directory")
]


def _sides(state: Path | None, store: str | None) -> None:
    from fedvault.errors import InvalidConfigError

    if (state is None) == (store is None):
        raise InvalidConfigError(
            "give --state (a hospital's state directory: decrypts any version) or --store "
            "(the coordinator's round store: plaintext jobs only), not both and not neither"
        )


def _at_rest_key(kit: Path | None) -> bytes | None:
    if kit is None:
        return None
    from fedvault.kit import Kit, KitKind

    return Kit.load(kit, expected_kind=KitKind.COORDINATOR).at_rest_key()


@model_app.command("list")
def model_list(
    kit: _KitOpt = None,
    state: _StateOpt = None,
    store: _StoreOpt = None,
    job: Annotated[str | None, typer.Option(help="only this job")] = None,
    as_json: _Json = False,
) -> None:
    """The model versions (job, round) you can export, with their pooled metrics."""
    try:
        from fedvault.app.model_export import list_versions_hospital, list_versions_store

        _sides(state, store)
        if state is not None:
            versions = list_versions_hospital(state, job)
        else:
            versions = list_versions_store(str(store), job, at_rest_key=_at_rest_key(kit))
    except FedvaultError as exc:
        _fail(exc)
    if as_json:
        print_json(
            {
                "jobs": {
                    name: [{"round": v.round, "metrics": dict(v.metrics)} for v in rows]
                    for name, rows in sorted(versions.items())
                }
            }
        )
        return
    console = Console()
    if not versions:
        console.print("no model versions held")
        return
    for name, rows in sorted(versions.items()):
        names = sorted({k for v in rows for k in v.metrics})
        table = Table(title=f"Model versions of job {name}")
        for col in ("round", *names):
            table.add_column(col, justify="right")
        for v in rows:
            table.add_row(
                str(v.round),
                *("" if n not in v.metrics else f"{v.metrics[n]:.4f}" for n in names),
            )
        console.print(table)


@model_app.command("export")
def model_export(
    job: Annotated[str, typer.Option(help="the job's name")],
    out: Annotated[Path, typer.Option(help="new directory for the weights and the card")],
    kit: _KitOpt = None,
    state: _StateOpt = None,
    store: _StoreOpt = None,
    round_: Annotated[
        str,
        typer.Option("--round", help="latest | best (by the job's best_metric) | a round number"),
    ] = "latest",
) -> None:
    """Write a model version as safetensors plus a model card (JSON and text).

    A hospital exports any version it holds (it decrypts with its own HE key);
    the coordinator only plaintext jobs, since it cannot decrypt.
    """
    try:
        from fedvault.app.model_export import export_from_hospital, export_from_store

        _sides(state, store)
        if state is not None:
            path = export_from_hospital(
                state_dir=state, job=job, selector=round_, out=out, kit_dir=kit
            )
        else:
            path = export_from_store(
                store_url=str(store),
                job=job,
                selector=round_,
                out=out,
                at_rest_key=_at_rest_key(kit),
            )
    except FedvaultError as exc:
        _fail(exc)
    Console().print(f"exported job {job} ({round_}) to {path}")


@task_app.command("list")
def task_list() -> None:
    """Tasks installed in this environment (entry points of the fedvault.tasks group)."""
    from fedvault.task_registry import installed_tasks

    table = Table(title="Installed tasks")
    table.add_column("name")
    table.add_column("module:attribute")
    for name, target in sorted(installed_tasks().items()):
        table.add_row(name, target)
    Console().print(table)


@task_app.command("show")
def task_show(
    task: Annotated[str, typer.Argument(help="an installed task's name or MODULE:ATTR")],
) -> None:
    """A task's kind, defaults and fingerprint: what a site policy pins."""
    try:
        from fedvault.fingerprint import fingerprint_task
        from fedvault.task_registry import load_task

        loaded = load_task(task)
        fp = fingerprint_task(loaded.task, loaded.module)
    except FedvaultError as exc:
        _fail(exc)
    t = loaded.task
    console = Console()
    console.print(f"[bold]{t.name}[/bold] ({t.kind}, {t.num_outputs} outputs): {t.description}")
    console.print(f"  from        {loaded.module}")
    console.print(f"  defaults    {t.defaults}")
    console.print(f"  best metric {t.best_metric}")
    console.print(f"  identity    {fp.describe()}")
    console.print(f"  fingerprint {fp.digest}", highlight=False)


def main() -> None:
    """Run the ``fedvault`` command line; Ctrl-C exits with code 130.

    An error fedvault raises on purpose, or an ``OSError`` on a path (one the
    user gave: a directory that cannot be created, a file that cannot be read),
    ends as one line and its exit code; any other exception is a bug and keeps
    its traceback.
    """
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except FedvaultError as exc:
        code = _exit_code(exc)
        _error(str(exc), code)
        sys.exit(code)
    except OSError as exc:
        if exc.filename is None:
            raise
        what = exc.strerror or type(exc).__name__
        _error(f"{exc.filename}: {what}; give a path you may read or create", 2)
        sys.exit(2)
