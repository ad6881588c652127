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
    help="Federated learning for hospital consortia: DP-SGD + CKKS-encrypted aggregation.",
)
err = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Federated learning for hospital consortia: DP-SGD + CKKS-encrypted aggregation."""


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
            str(r["round"]), acc, loss, f"{eps:.3f}", str(len(r["participants"])),
            f"{r.get('bytes_received', 0):,}",
        )
    hospitals = Table(title="Hospitals (privacy spent in this job)")
    for col in ("hospital", "samples", "ε", "noise σ", "sample rate", "DP steps", "accountant"):
        hospitals.add_column(col, justify="right")
    for name, h in sorted(report["hospitals"].items()):
        hospitals.add_row(
            name, str(h["samples"]), f"{h['epsilon']:.3f}", f"{h['noise_multiplier']:.3f}",
            f"{h['sample_rate']:.4f}", str(h["steps"]), h["accountant"],
        )
    console.print(rounds)
    console.print(hospitals)
    final = report["final"]
    acc = final.get("accuracy")
    console.print(
        f"[bold]final accuracy[/bold] {acc if acc is None else f'{acc:.4f}'}   "
        f"[bold]max ε[/bold] {final['epsilon_max']:.3f} at δ={final['delta']:g}   "
        f"[bold]rounds[/bold] {final['rounds_completed']}   status {final['status']}"
    )
    console.print(f"report: {out_dir / 'report.json'}  plot: {out_dir / 'report.png'}")


@app.command()
def simulate(
    example: Annotated[str, typer.Option(help="breast-cancer | digits")] = "breast-cancer",
    hospitals: Annotated[int, typer.Option(help="number of virtual hospitals")] = 3,
    rounds: Annotated[int, typer.Option(help="federated rounds")] = 10,
    partition: Annotated[str, typer.Option(help="iid | dirichlet:ALPHA")] = "iid",
    secure_aggregation: Annotated[str, typer.Option(help="he (CKKS) | none")] = "he",
    epsilon: Annotated[float, typer.Option(help="ε budget per hospital for the job")] = 3.0,
    delta: Annotated[float, typer.Option(help="δ of the (ε, δ) guarantee")] = 1e-5,
    seed: Annotated[int, typer.Option(help="seeds data split, partition, init and noise")] = 0,
    out: Annotated[Path, typer.Option(help="output directory (report, plot, store)")] = Path(
        "fedvault-out"
    ),
    store: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL of the round store (default: SQLite in --out)")
    ] = None,
    job: Annotated[str | None, typer.Option(help="job name (default: derived from settings)")] = None,
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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
