"""The ``fedvault`` command line (Typer). Commands and flags are a contract: see DESIGN.md.

Every error fedvault raises on purpose becomes one line on stderr and exit
code 2, before anything is half-written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedvault.privacy.errors import FedvaultError

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


def _fail(exc: FedvaultError) -> None:
    err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def print_summary(report: dict[str, Any], console: Console, out_dir: Path) -> None:
    """The readable end of a run: per-round accuracy, per-hospital privacy spend."""
    rounds = Table(title="Rounds", show_lines=False)
    for col in ("round", "accuracy", "loss", "max ε", "participants", "bytes received"):
        rounds.add_column(col, justify="right")
    for r in report["rounds"]:
        eps = max(r["epsilon"].values(), default=0.0)
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        loss = "n/a" if r["loss"] is None else f"{r['loss']:.4f}"
        rounds.add_row(
            str(r["round"]),
            acc,
            loss,
            f"{eps:.3f}",
            str(len(r["participants"])),
            f"{r.get('bytes_received', 0):,}",
        )
    hospitals = Table(title="Hospitals (privacy spent in this job)")
    for col in ("hospital", "samples", "ε", "noise σ", "sample rate", "DP steps", "accountant"):
        hospitals.add_column(col, justify="right")
    for name, h in sorted(report["hospitals"].items()):
        hospitals.add_row(
            name,
            str(h["samples"]),
            f"{h['epsilon']:.3f}",
            f"{h['noise_multiplier']:.3f}",
            f"{h['sample_rate']:.4f}",
            str(h["steps"]),
            h["accountant"],
        )
    console.print(rounds)
    console.print(hospitals)
    final = report["final"]

    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    console.print(
        f"[bold]final accuracy[/bold] {num(final.get('accuracy'), '.4f')}   "
        f"[bold]max ε[/bold] {num(final.get('epsilon_max'), '.3f')} "
        f"at δ={num(final.get('delta'), 'g')}   "
        f"[bold]rounds[/bold] {final['rounds_completed']}   status {final['status']}"
    )
    console.print(f"report: {out_dir / 'report.json'}  plot: {out_dir / 'report.png'}")


@app.command()
def simulate(
    example: Annotated[str, typer.Option(help="breast-cancer | digits")] = "breast-cancer",
    hospitals: Annotated[int, typer.Option(help="number of virtual hospitals")] = 3,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 10,
    partition: Annotated[str, typer.Option(help="iid | dirichlet:ALPHA")] = "iid",
    secure_aggregation: Annotated[str, typer.Option(help="he (BFV, encrypted) | none")] = "he",
    epsilon: Annotated[float, typer.Option(help="ε budget per hospital for the job")] = 3.0,
    delta: Annotated[float, typer.Option(help="δ of the (ε, δ) guarantee")] = 1e-5,
    seed: Annotated[int, typer.Option(help="seeds data split, partition, init and noise")] = 0,
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
) -> None:
    """Simulate a consortium of virtual hospitals with the production apps."""
    try:
        from fedvault.config import JobConfig
        from fedvault.examples import get_example
        from fedvault.simulation import simulate as run

        task = get_example(example)
        config = JobConfig.for_example(
            task,
            hospitals=hospitals,
            rounds=rounds,
            epsilon=epsilon,
            delta=delta,
            partition=partition,
            secure_aggregation=secure_aggregation,
            seed=seed,
            job=job,
        )
        console = Console()
        report = run(config, example=task, out_dir=out, store_url=store, console=console)
        print_summary(report, console, out.resolve())
    except FedvaultError as exc:
        _fail(exc)
    if report["final"]["status"] != "finished":
        raise typer.Exit(code=1)


coordinator_app = typer.Typer(no_args_is_help=True, help="The consortium operator's daemon.")
client_app = typer.Typer(no_args_is_help=True, help="A hospital's daemon.")
audit_app = typer.Typer(no_args_is_help=True, help="The tamper-evident audit log.")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(client_app, name="client")
app.add_typer(audit_app, name="audit")


def _daemon_logging() -> None:
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )


@app.command()
def provision(
    consortium: Annotated[
        Path, typer.Argument(help="consortium TOML (see examples/consortium.toml)")
    ],
    out: Annotated[Path, typer.Option(help="new, empty directory for the CA and every kit")],
) -> None:
    """Create the consortium CA, the coordinator's, hospitals' and operators' kits."""
    try:
        from fedvault.provision import provision as run

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
        Path, typer.Option(help="job TOML ([job] name, example, hospitals, rounds, epsilon, ...)")
    ],
    state: Annotated[
        Path, typer.Option(help="state directory (SuperLink db, keys, report)")
    ] = Path("fedvault-coordinator"),
    store: Annotated[
        str | None, typer.Option(help="round store URL (default: SQLite in --state)")
    ] = None,
) -> None:
    """Start the SuperLink (TLS, node auth), enrol hospitals, serve the operator API, run."""
    import threading

    from fedvault.coordinator.daemon import (
        CoordinatorOptions,
        install_signal_handlers,
        run_coordinator,
    )

    _daemon_logging()
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        status = run_coordinator(
            CoordinatorOptions(kit_dir=kit, job_file=job, state_dir=state, store_url=store),
            stop=stop,
        )
    except FedvaultError as exc:
        _fail(exc)
    err.print(f"job ended: {status}")
    if status not in ("finished", "stopped"):
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
) -> None:
    """Validate the hospital's data, then run its SuperNode (outbound only) until stopped."""
    import threading

    from fedvault.client.daemon import ClientOptions, run_client
    from fedvault.coordinator.daemon import install_signal_handlers

    _daemon_logging()
    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        run_client(
            ClientOptions(kit_dir=kit, data=data, state_dir=state, epsilon_budget=epsilon_budget),
            stop=stop,
        )
    except FedvaultError as exc:
        _fail(exc)


@app.command()
def status(
    kit: Annotated[Path, typer.Option(help="an operator kit")],
    job: Annotated[str, typer.Option(help="job name (default: the latest)")] = "",
) -> None:
    """Job status, rounds, privacy ledger and audit log, as far as your role allows."""
    try:
        from fedvault.kit import Kit
        from fedvault.operator_client import OperatorClient
        from fedvault.status_view import render_status

        with OperatorClient(Kit.load(kit)) as client:
            render_status(client, Console(), job=job)
    except FedvaultError as exc:
        _fail(exc)


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(help="new directory to keep everything in")] = None,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 10,
) -> None:
    """A 3-hospital consortium as real processes on 127.0.0.1, end to end."""
    try:
        from fedvault.demo import run_demo

        console = Console()
        report = run_demo(out, console, rounds=rounds)
        print_summary(report, console, Path(report.get("out_dir", out or ".")))
    except FedvaultError as exc:
        _fail(exc)
    if report["final"]["status"] != "finished":
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
