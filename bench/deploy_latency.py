"""Deployment latency: seconds per round of ``fedvault demo`` against plain Flower.

Both sides run as real processes on 127.0.0.1 with the same TLS and SuperNode
authentication, three hospitals, the breast-cancer logistic regression:

* **ours**: ``fedvault demo`` (coordinator daemon, three hospital daemons), with
  masking (the default: one extra message round trip per round, the unmask
  query) and without; seconds per round are the gaps between the store's
  ``committed_at`` stamps.
* **plain Flower**: the same consortium's kits (CA, coordinator certificate,
  node keys) driving our :class:`SuperLinkProcess` (``flower-superlink`` behind
  the Fleet gateway, ``--enable-supernode-auth``) and three
  :class:`SuperNodeSupervisor`\\ s, running a plain Flower app: Flower's own
  ``FedAvg`` (train and evaluate every round, its default), a torch logistic
  regression on each hospital's CSV share, no DP, no HE, no masking. Seconds
  per round are the gaps between the ServerApp's per-round ``evaluate_fn`` calls.

Each is measured at Flower's default SuperExec task poll (1 s) and at
fedvault's (:data:`fedvault.flower_env.SUPEREXEC_TASK_POLL_S`, which plain
Flower gets too: it is a Flower setting, ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``),
interleaved; the per-round figure is the median of rounds 2..N (round 1
includes the first ClientApp process starts and, for ours, the key ceremony).
What Flower 1.41 does not let one configure is listed in ``REMAINS``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import Row, Section
from fedvault.flower_env import app_pyproject

__all__ = ["REMAINS", "run"]

#: Where a round's seconds still go, per message round trip, that no Flower 1.41
#: setting reaches (read in flwr/supernode/start_client_internal.py and
#: flwr/superlink/grid/http_grid.py).
REMAINS = (
    "SuperNode: sleeps a fixed 3 s after an empty pull (a 3-node round waits ~2.25 s for "
    "the last node to notice), and polls its ClientApp's reply every 0.5 s; "
    "one flwr-clientapp process per message (import flwr ~0.4 s CPU; fedvault's "
    "ClientApp imports torch only to train: ~0.5 s of imports for the unmask query); "
    "plain Flower's Grid.send_and_receive polls replies every 3 s"
)

ROUNDS_FULL, ROUNDS_QUICK = 5, 2  # quick: one gap between rounds, so one per-round figure
#: --quick runs the headline pair only (real processes: ~a minute a job, see bench/README.md).
QUICK_CONFIGS = ("flower", "ours_masked")
CAP_S = 900  # per job, generous on a loaded 2-core host
TARGET_RATIO = 1.1  # ours / plain Flower, both at fedvault's settings
_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
FLOWER_DEFAULT_POLL = "1.0"  # Flower 1.41's default SuperExec task poll, seconds


SERVER_PY = """\
import json, time
import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    n = int(context.run_config["nodes"])
    stamps = []
    def stamp(server_round, arrays):
        stamps.append([server_round, time.time()])
        return None
    strategy = FedAvg(min_available_nodes=n, min_train_nodes=n, min_evaluate_nodes=n)
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros((1, 30), np.float32), np.zeros(1, np.float32)]),
        num_rounds=int(context.run_config["num-rounds"]),
        evaluate_fn=stamp,
    )
    with open(str(context.run_config["out-file"]), "w") as f:
        json.dump({"stamps": stamps}, f)
"""

CLIENT_PY = """\
import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

def _data(context, split):
    raw = np.loadtxt(str(context.node_config[split]), delimiter=",", skiprows=1)
    t = torch.tensor(raw, dtype=torch.float32)
    return t[:, :-1], t[:, -1:]

def _model(msg):
    model = torch.nn.Linear(30, 1)
    w, b = msg.content["arrays"].to_numpy_ndarrays()
    model.load_state_dict({"weight": torch.tensor(w), "bias": torch.tensor(b)})
    return model

@app.train()
def train(msg: Message, context: Context) -> Message:
    x, y = _data(context, "train")
    model = _model(msg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for i in range(0, len(x), 32):
        opt.zero_grad()
        loss_fn(model(x[i:i + 32]), y[i:i + 32]).backward()
        opt.step()
    arrays = ArrayRecord([model.weight.detach().numpy(), model.bias.detach().numpy()])
    metrics = MetricRecord({"num-examples": len(x)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    x, y = _data(context, "test")
    with torch.no_grad():
        acc = float(((_model(msg)(x) > 0).float() == y).float().mean())
    metrics = MetricRecord({"accuracy": acc, "num-examples": len(x)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
"""


@contextlib.contextmanager
def _poll(value: str | None) -> Iterator[None]:
    """Run with the SuperExec task poll ``value`` (None: fedvault's default)."""
    old = os.environ.get(_POLL_ENV)
    if value is None:
        os.environ.pop(_POLL_ENV, None)
    else:
        os.environ[_POLL_ENV] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_POLL_ENV, None)
        else:
            os.environ[_POLL_ENV] = old


def _per_round(stamps: list[float]) -> dict[str, Any]:
    """Median gap between consecutive rounds, leaving round 1 out (see the docstring)."""
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"gaps_s": gaps, "round_s": statistics.median(gaps) if gaps else None}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ours(work: Path, rounds: int, masking: bool) -> dict[str, Any]:
    """``fedvault demo`` in a child process; seconds per round from the store's stamps."""
    from bench.common import run_child
    from fedvault.app.demo import JOB_NAME
    from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url

    out = work / f"demo-{'masked' if masking else 'unmasked'}-{time.monotonic_ns()}"
    flag = "--masking" if masking else "--no-masking"
    load = _load()
    done = run_child("fedvault", ["demo", "--out", str(out), "--rounds", str(rounds), flag], CAP_S)
    result: dict[str, Any] = {"wall_s": done.wall_s, "rc": done.returncode, "load": load}
    try:
        with RoundStore(sqlite_url(out / "coordinator" / DEFAULT_STORE_FILENAME)) as store:
            job = store.get_job(JOB_NAME)
            views = [v for v in store.rounds(job.id) if v.status == "committed"] if job else []
    except Exception as exc:  # no store: the demo failed before the job, say why
        return {**result, "ok": False, "reason": f"{exc!r}; {done.stderr[-1500:]}"}
    stamps = [v.committed_at.timestamp() for v in views if v.committed_at is not None]
    result.update(_per_round(stamps), committed=len(stamps), logs=str(out / "logs"))
    result["ok"] = done.returncode == 0 and len(stamps) == rounds
    if not result["ok"]:
        result["reason"] = done.stderr[-1500:]
    return result


def _plain_app(root: Path) -> Path:
    pkg = root / "fvplainapp"
    pkg.mkdir(parents=True)
    pyproject = app_pyproject(
        name="fvplainapp",
        description="plain Flower baseline for fedvault's deploy latency bench",
        serverapp="fvplainapp.server:app",
        clientapp="fvplainapp.client:app",
        config='num-rounds = 3\nnodes = 3\nout-file = ""',
    )
    (root / "pyproject.toml").write_text(pyproject)
    (pkg / "__init__.py").write_text("")
    (pkg / "server.py").write_text(SERVER_PY)
    (pkg / "client.py").write_text(CLIENT_PY)
    return root


def plain_flower(work: Path, rounds: int, hospitals: int = 3) -> dict[str, Any]:
    """Plain Flower's FedAvg over our SuperLink/SuperNode processes, the demo's kits and data."""
    from fedvault.app.demo import prepare_consortium
    from fedvault.client.supernode import SuperNodeConfig, SuperNodeSupervisor
    from fedvault.coordinator.superlink import SuperLinkConfig, SuperLinkProcess
    from fedvault.flower_env import free_port
    from fedvault.kit import Kit, KitKind

    work = work / f"plain-{time.monotonic_ns()}"
    work.mkdir(parents=True)
    paths = prepare_consortium(work, hospitals=hospitals, rounds=rounds, epsilon=3.0)
    kit = Kit.load(paths["kits"] / "coordinator", expected_kind=KitKind.COORDINATOR)
    link = SuperLinkProcess(SuperLinkConfig.for_kit(kit, work / "superlink"))
    out_file = work / "stamps.json"
    load = _load()
    started = time.monotonic()
    with link:
        link.control.register_nodes(list(kit.node_public_key_paths().values()))
        nodes = []
        for name in kit.manifest.hospitals:
            hkit = Kit.load(paths["kits"] / "hospitals" / name, expected_kind=KitKind.HOSPITAL)
            data = paths["data"] / name
            config = SuperNodeConfig(
                superlink=hkit.coordinator_address,
                root_certificates=hkit.ca_path,
                private_key=hkit.node_key_path,
                state_dir=work / "supernodes" / name,
                runtime_port=free_port(),
                node_config={"train": str(data / "train.csv"), "test": str(data / "test.csv")},
            )
            nodes.append(SuperNodeSupervisor(config))
        with contextlib.ExitStack() as stack:
            for node in nodes:
                stack.enter_context(node)
            run_id = link.control.submit_run(
                _plain_app(work / "app"),
                {"num-rounds": rounds, "nodes": hospitals, "out-file": str(out_file)},
            )
            status = link.control.wait_run(run_id, timeout=CAP_S, poll_interval=1.0)
    result: dict[str, Any] = {"wall_s": time.monotonic() - started, "load": load}
    result["ok"] = status.succeeded and out_file.is_file()
    if not result["ok"]:
        return {**result, "reason": f"{status}; see {link.superlink_log}"}
    # evaluate_fn runs once before round 1 (round 0) and after each round.
    stamps = [t for r, t in json.loads(out_file.read_text())["stamps"] if r >= 1]
    result.update(_per_round(stamps), committed=len(stamps), logs=str(work))
    return result


def _guarded(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return dict(fn(*args))
    except Exception as exc:  # one failed job must not lose the others' numbers
        return {"ok": False, "reason": repr(exc)}


def measure(
    quick: bool,
    repeats: int = 1,
    only: str | None = None,
    poll: str = "both",
    keep: Path | None = None,
) -> dict[str, Any]:
    """Every configuration, interleaved ``repeats`` times; the minimum per-round seconds each."""
    rounds = ROUNDS_QUICK if quick else ROUNDS_FULL
    configs: dict[str, tuple[Any, ...]] = {
        "flower": (plain_flower, rounds),
        "ours_unmasked": (ours, rounds, False),
        "ours_masked": (ours, rounds, True),
    }
    if only is not None:
        configs = {only: configs[only]}
    elif quick:
        configs = {name: configs[name] for name in QUICK_CONFIGS}
    polls: dict[str, str | None] = {"default_poll": FLOWER_DEFAULT_POLL, "fedvault_poll": None}
    if poll != "both":
        polls = {k: v for k, v in polls.items() if k == poll}
    runs: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as stack:
        tmp = str(keep) if keep else stack.enter_context(tempfile.TemporaryDirectory())
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for _ in range(repeats):
            for (pname, pval), (cname, (fn, *args)) in itertools.product(
                polls.items(), configs.items()
            ):
                with _poll(pval):
                    res = _guarded(fn, Path(tmp), *args)
                runs.setdefault(f"{cname}@{pname}", []).append(res)
                print(f"{cname}@{pname}: {res.get('round_s')} s/round", file=sys.stderr)
    best = {
        key: min((r["round_s"] for r in rs if r.get("ok") and r.get("round_s")), default=None)
        for key, rs in runs.items()
    }
    return {"rounds": rounds, "repeats": repeats, "best_round_s": best, "runs": runs}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run(quick: bool = False) -> Section:
    """Section ``deploy``: seconds per round, ``fedvault demo`` vs plain Flower, side by side."""
    # Quick: fedvault's settings, masked vs Flower only (two jobs); full adds the
    # unmasked demo and Flower's default poll.
    res = measure(quick, poll="fedvault_poll" if quick else "both")
    best = res["best_round_s"]
    section = Section(name="deploy", details={**res, "remains": REMAINS})
    for poll, label in (
        ("fedvault_poll", "fedvault's settings (after)"),
        ("default_poll", "Flower's default SuperExec poll (before)"),
    ):
        flower = best.get(f"flower@{poll}")
        for kind in ("unmasked", "masked"):
            mine = best.get(f"ours_{kind}@{poll}")
            headline = poll == "fedvault_poll" and kind == "masked"
            ratio = _ratio(mine, flower)
            section.rows.append(
                Row(
                    f"deploy: s/round, fedvault demo ({kind}) vs plain Flower FedAvg, {label}",
                    mine,
                    flower,
                    "s",
                    target=f"<= {TARGET_RATIO}x" if headline else "",
                    passed=None if quick or not headline or ratio is None
                    else ratio <= TARGET_RATIO,
                    note=f"{res['rounds']} rounds, median of rounds 2-{res['rounds']}",
                )
            )  # fmt: skip
    section.keys["deploy_round_ratio"] = _ratio(
        best.get("ours_masked@fedvault_poll"), best.get("flower@fedvault_poll")
    )
    section.keys["deploy_round_s"] = best.get("ours_masked@fedvault_poll")
    section.keys["baseline_deploy_round_s"] = best.get("flower@fedvault_poll")
    section.keys["deploy_unmasked_round_s"] = best.get("ours_unmasked@fedvault_poll")
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy_latency")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=["flower", "ours_unmasked", "ours_masked"])
    parser.add_argument("--poll", choices=["both", "default_poll", "fedvault_poll"])
    parser.add_argument("--keep", type=Path, help="work (and keep the logs) in this directory")
    args = parser.parse_args(argv)
    if args.repeats != 1 or args.only or args.poll or args.keep:
        res = measure(args.quick, args.repeats, args.only, args.poll or "both", args.keep)
        print(json.dumps(res, default=str, indent=1))
        return
    section = run(args.quick)
    print(json.dumps({"keys": section.keys, "details": section.details}, default=str, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
