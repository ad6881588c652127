"""Section ``secagg``: what masking (SecAgg+ inside BFV) and cryptographic noise cost.

Everything side by side in one run, each as a ratio to the same work without it:

1. **A hospital, per round** (n = 3, 5, 10 hospitals; complete graph, the default
   threshold). Ours: everything masking makes a hospital do for one
   ``SIZE``-parameter update (float32, a weight matrix and a bias): key agreement
   with its n - 1 neighbours, its self-mask seed's sealed Shamir shares, the n
   masks expanded and added while encrypting (``encrypt_masked_update``), plus
   its answer to the coordinator's unmask query (``unmask_reply``). Baseline:
   ``encrypt_update`` of the same update. Interleaved per hospital, the minimum
   over the round's hospitals is kept. **Bytes**: what a hospital sends per round,
   serialised as Flower puts it on the wire (``recorddict_to_proto`` of the
   message content): masked, the ``TrainReply`` with its envelope and masked
   shares plus the ``UnmaskAnswer``; unmasked, the ``TrainReply`` with its
   envelope. What it receives in addition (the ``UnmaskQuery`` and the
   participants list in the instruction) is in ``details``.
2. **The coordinator, per round**: its extra work (record and check the
   survivors' shares, close, the unmask requests, check the replies, rebuild the
   self masks from the shares and the dropped hospitals' pair masks, subtract the
   correction from every chunk of the encrypted sum: ``apply_correction``) with 0
   and with the most tolerated dropouts (k - T: 0, 1, 3 at n = 3, 5, 10), against
   the encrypted aggregation of the same round's updates (``Aggregator``: parse,
   check and add each envelope). Each corrected sum is decrypted and checked bit
   for bit against the unmasked sum of the same hospitals (``details``).
3. **A simulated consortium**: ``fedvault.app.simulation.simulate`` (the
   production ClientApp and ServerApp, DP-SGD with noise from the CSPRNG as
   deployed hospitals draw it, BFV, the SQLite store, reports) on breast-cancer,
   3 hospitals, 2 rounds, ``he`` mode, masking on vs off, each job in its own
   process (:func:`bench.common.run_child`). Seconds per round: round 2, from the
   end of round 1 to the end of round 2 in the ServerApp (round 1 also holds Ray's
   start-up). This is the simulated pipeline, not ``fedvault demo`` (real
   processes, minutes per run): the same ClientApp/ServerApp code, without the
   gRPC transport and the daemons.
4. **The deployed demo**: ``fedvault demo`` (three hospital daemons and the
   coordinator daemon as real processes, TLS on 127.0.0.1, the demo's
   breast-cancer job) with ``--masking`` and ``--no-masking``, ``DEPLOY_ROUNDS``
   rounds each, one after the other. Seconds per round: the median gap between
   consecutive rounds' ``committed_at`` in the store (round 1 also holds
   enrolment and the daemons' start-up). Full mode only (minutes per run).
5. **Cryptographic noise**: the digits CNN's DP-SGD step as trained, with noise and
   Poisson batches from the CSPRNG vs torch's generator
   (:func:`bench.dp_step.secure_noise_cost`, the ``dp`` section's code), and one
   noise draw of 1M / 10M values.

Timing: process CPU time (:func:`time.process_time`: all of this process's
threads, since the aggregator loads chunks on a thread pool) for parts 1 and 2,
the minimum over repeats; wall time for the simulations; thread CPU time for the
DP step (one torch thread). Targets are judged in full mode only.

Run one simulated job by hand::

    python -m bench.secagg --child '{"masking": true, "hospitals": 3, "rounds": 2}'
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Row, Section, best_of, make_updates, run_child, timed

__all__ = ["run"]

SIZES = (3, 5, 10)
QUICK_SIZES = (3, 5)  # --quick: n = 5 also runs the dropped-hospital correction (3 has none)
SIZE, QUICK_SIZE = 1_000_000, 20_000  # parameters per update (the he section's 1M)
REPEATS, QUICK_REPEATS = 3, 1
SIM_HOSPITALS, SIM_ROUNDS = 3, 2
QUICK_SIM_ROUNDS = 1  # --quick: round 1, Ray's start-up included
SIM_REPEATS, QUICK_SIM_REPEATS = 2, 1  # each, interleaved: on, off, off, on
SIM_CAP_S = 600
DEPLOY_ROUNDS, DEPLOY_CAP_S = 5, 600  # fedvault demo (full mode only): rounds, time cap
JOB = "bench-secagg"
CLOCK = time.process_time

# Targets (full mode).
TARGET_HOSPITAL = 2.0  # masked hospital seconds / encrypt_update, every n
TARGET_BYTES = 1.1  # bytes a hospital sends, masked / unmasked, every n
TARGET_CORRECTION = 1.0  # coordinator's extra work / the round's aggregation, 0 dropped
TARGET_CORRECTION_DROPPED = 2.0  # the same, the most tolerated dropouts
TARGET_ROUND = 1.5  # simulated round, masking on / off
TARGET_NOISE = 1.5  # DP-SGD step with CSPRNG noise / with torch's generator


# --- 1 and 2: one round, hospital and coordinator ----------------------------------------


def _wire_bytes(content: Any) -> int:
    """Bytes of a message's content as Flower serialises it (metadata is the same both ways)."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())


def _train_reply(hospital: str, envelope: bytes, shares: str, samples: int) -> Any:
    """A hospital's train reply as ``client_app`` sends it (realistic metadata)."""
    from fedvault.messages import ModelPayload, ReplyStatus, TrainReply
    from fedvault.privacy.dp import AccountantState

    return TrainReply(
        hospital=hospital,
        status=ReplyStatus.OK,
        update=ModelPayload(envelope=envelope),
        samples=samples,
        train_loss=0.5,
        epsilon=0.3,
        delta=1e-5,
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=20,
        round_steps=10,
        accountant="prv",
        accountant_state=AccountantState("prv", ((1.0, 0.1, 20),)).to_json(),
        eval_accuracy=0.5,
        eval_loss=1.0,
        eval_samples=10,
        masked_shares=shares,
    )


def _bytes(n: int, survivors: list[str], sent: dict[str, Any], coord: Any, plain: dict) -> dict:
    """Bytes one hospital sends (and receives in addition) per round, masked vs unmasked."""
    from flwr.app import ConfigRecord, RecordDict

    from fedvault.messages import ReplyStatus, UnmaskAnswer, UnmaskQuery

    masked: list[int] = []
    unmasked: list[int] = []
    query: list[int] = []
    for i, p in enumerate(survivors):
        env, shares, reply = sent[p]
        train = _train_reply(p, env, shares.to_bytes().decode(), 100 + 37 * i)
        answer = UnmaskAnswer(hospital=p, status=ReplyStatus.OK, reply=reply)
        masked.append(_wire_bytes(train.to_content()) + _wire_bytes(answer.to_content()))
        unmasked.append(_wire_bytes(_train_reply(p, plain[p], "", 100 + 37 * i).to_content()))
        q = UnmaskQuery(job=JOB, server_round=1, request=coord.request_for(p))
        query.append(_wire_bytes(q.to_content()))
    names = list(coord.context.participants)

    def participants(listed: list[str]) -> int:
        return _wire_bytes(RecordDict({"c": ConfigRecord({"participants": listed})}))

    return {
        "sent_masked": sum(masked) / len(masked),
        "sent_unmasked": sum(unmasked) / len(unmasked),
        "envelope_masked": len(sent[survivors[0]][0]),
        "envelope_unmasked": len(plain[survivors[0]]),
        "shares_json": len(sent[survivors[0]][1].to_bytes()),
        "received_extra": sum(query) / len(query) + participants(names) - participants([]),
        "hospitals": n,
    }


def _coordinator(
    pub: Any, context: Any, sent: dict[str, Any], survivors: list[str], t: int, repeats: int
) -> dict[str, Any]:
    """The coordinator's extra work vs its aggregation, one round (``survivors`` replied)."""
    from bench.secagg_cost import aggregate, correct, open_unmasking, unmask_requests

    envelopes = [sent[p][0] for p in survivors]
    shares = [sent[p][1] for p in survivors]
    replies = [sent[p][2] for p in survivors]
    agg_s, total = best_of(lambda: aggregate(pub, envelopes), repeats, CLOCK)

    def extra() -> bytes:
        coord = open_unmasking(context, shares, t)
        unmask_requests(coord)
        return correct(pub, total, coord, replies)

    corr_s, corrected = best_of(extra, repeats, CLOCK)
    return {"aggregate_s": agg_s, "correction_s": corr_s, "corrected": corrected}


def _masked_round(
    ctx: Any, model: dict, n: int, dropouts: int, plain: dict[str, bytes] | None
) -> dict[str, Any]:
    """One round: every survivor masks and encrypts (timed), then answers the unmask query.

    With ``plain``, each survivor also encrypts unmasked (interleaved: the same load),
    into ``plain``. The ``dropouts`` first hospitals drop before sending: their shares
    never reach the coordinator, so their masking is not timed here.
    """
    from bench.secagg_cost import masked_encrypt, open_unmasking, sessions, unmask_requests
    from fedvault.privacy.he import encrypt_update

    t = ctx.params.plain_modulus
    masking, context = sessions(n, t, f"{n}-{dropouts}".encode(), job=JOB)
    survivors = list(masking)[dropouts:]
    sent: dict[str, Any] = {}
    plain_s: list[float] = []
    masked_s: list[float] = []
    answer_s: list[float] = []
    for p in survivors:
        weight = float(100 + 37 * context.participants.index(p))  # the same in every round
        kwargs: dict[str, Any] = {"weight": weight, "job": JOB, "server_round": 1}
        if plain is not None:
            seconds, plain[p] = timed(lambda kw=kwargs: encrypt_update(ctx, model, **kw), CLOCK)
            plain_s.append(seconds)
        seconds, sent[p] = timed(
            lambda s=masking[p], kw=kwargs: masked_encrypt(ctx, s, model, **kw), CLOCK
        )
        masked_s.append(seconds)
    coord = open_unmasking(context, (sent[p][1] for p in survivors), t)
    for p, request in unmask_requests(coord).items():
        seconds, reply = timed(lambda s=masking[p], r=request: s.unmask_reply(r), CLOCK)
        answer_s.append(seconds)
        sent[p] = (*sent[p], reply)
    return {
        "context": context,
        "survivors": survivors,
        "sent": sent,
        "coord": coord,
        "plain_s": plain_s,
        "masked_s": masked_s,
        "answer_s": answer_s,
    }


def _exact(ctx: Any, corrected: bytes, plain: dict[str, bytes], survivors: list[str]) -> bool:
    """Does the corrected masked sum decrypt bit for bit to the unmasked sum?"""
    from bench.secagg_cost import aggregate
    from fedvault.privacy.he import decrypt_average

    got = decrypt_average(ctx, corrected)
    want = decrypt_average(ctx, aggregate(ctx.public(), (plain[p] for p in survivors)))
    return got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)


def _one_size(ctx: Any, model: dict, n: int, repeats: int) -> dict[str, Any]:
    """Hospital seconds, bytes, and the coordinator at 0 and the most tolerated dropouts."""
    from bench.secagg_cost import most_dropouts

    pub, t = ctx.public(), ctx.params.plain_modulus
    plain: dict[str, bytes] = {}
    full = _masked_round(ctx, model, n, 0, plain)
    rounds = {0: full}
    out: dict[str, Any] = {
        "hospital_plain_s": min(full["plain_s"]),
        "hospital_mask_encrypt_s": min(full["masked_s"]),
        "hospital_unmask_answer_s": min(full["answer_s"]),
        "bytes": _bytes(n, full["survivors"], full["sent"], full["coord"], plain),
    }
    d = most_dropouts(n)
    if d:
        rounds[d] = _masked_round(ctx, model, n, d, None)
    coordinator: dict[str, Any] = {}
    for dropped, r in rounds.items():
        c = _coordinator(pub, r["context"], r["sent"], r["survivors"], t, repeats)
        c["exact"] = _exact(ctx, c.pop("corrected"), plain, r["survivors"])
        c["ratio"] = c["correction_s"] / c["aggregate_s"]
        c["updates_aggregated"] = len(r["survivors"])
        coordinator[str(dropped)] = c
    out["hospital_masked_s"] = out["hospital_mask_encrypt_s"] + out["hospital_unmask_answer_s"]
    out["hospital_ratio"] = out["hospital_masked_s"] / out["hospital_plain_s"]
    out["bytes_ratio"] = out["bytes"]["sent_masked"] / out["bytes"]["sent_unmasked"]
    out["coordinator"] = coordinator
    return out


def _rounds(quick: bool) -> dict[str, Any]:
    from fedvault.privacy.he_context import HeContext

    size = QUICK_SIZE if quick else SIZE
    repeats = QUICK_REPEATS if quick else REPEATS
    updates, _ = make_updates(1, size)
    ctx = HeContext.generate()
    sizes = QUICK_SIZES if quick else SIZES
    per_n = {str(n): _one_size(ctx, updates[0], n, repeats) for n in sizes}
    return {"params": size, "repeats": repeats, "clock": "process CPU time", "n": per_n}


# --- 3: a simulated consortium, masking on vs off -----------------------------------------


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``simulate`` job (this process); seconds per round from the ServerApp's thread."""
    from rich.console import Console

    from fedvault.app import simulation
    from fedvault.config import JobConfig
    from fedvault.coordinator import server_app, strategy
    from fedvault.examples.breast_cancer import EXAMPLE

    masking = bool(spec["masking"])
    config = JobConfig.for_task(
        EXAMPLE,
        hospitals=int(spec["hospitals"]),
        rounds=int(spec["rounds"]),
        secure_aggregation="he",
        masking=masking,
        seed=0,
        job=f"{JOB}-{'masked' if masking else 'unmasked'}",
    )
    marks: dict[str, Any] = {"ends": [], "seen": set(), "failures": [], "answers": 0, "unmask_s": 0}
    # Evidence that rounds were masked, and the unmask round trip's share of the time.
    add_unmask, unmask = strategy.RoundCollector.add_unmask, server_app._RoundRunner._unmask

    def counted(self: Any, msg: Any) -> None:
        marks["answers"] += 1
        add_unmask(self, msg)

    def timed_unmask(self: Any, collector: Any) -> None:
        start = time.perf_counter()
        try:
            unmask(self, collector)
        finally:
            marks["unmask_s"] += time.perf_counter() - start

    strategy.RoundCollector.add_unmask = counted  # type: ignore[method-assign]
    server_app._RoundRunner._unmask = timed_unmask  # type: ignore[method-assign]

    class TimedObserver(simulation.RichObserver):
        def on_start(self, job: Any, resumed_after: int) -> None:
            marks["start"] = time.perf_counter()
            super().on_start(job, resumed_after)

        def on_round(self, view: Any) -> None:
            if view.number not in marks["seen"]:  # the last round is shown twice
                marks["seen"].add(view.number)
                marks["ends"].append(time.perf_counter())
            super().on_round(view)

        def on_round_failed(self, number: int, attempt: int, reason: str) -> None:
            marks["failures"].append(f"round {number} attempt {attempt}: {reason}"[:1000])
            super().on_round_failed(number, attempt, reason)

    simulation.RichObserver = TimedObserver  # type: ignore[misc]
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="fedvault-secagg-") as tmp,
        open(os.devnull, "w") as sink,
    ):
        report = simulation.simulate(
            config, out_dir=Path(tmp), console=Console(file=sink), secure_rng=True
        )
    wall = time.perf_counter() - start
    ends = [marks.get("start", start), *marks["ends"]]
    round_s = [b - a for a, b in itertools.pairwise(ends)]
    return {
        "masking": masking,
        "status": report.get("final", {}).get("status"),
        "rounds": len(report.get("rounds", [])),
        "rounds_asked": config.rounds,
        "accuracy": report.get("final", {}).get("accuracy"),
        "round_s": round_s,
        "wall_s": wall,
        "unmask_answers": marks["answers"],
        "unmask_exchange_s": marks["unmask_s"],
        "round_failures": marks["failures"],
    }


def _sim_job(masking: bool, rounds: int = SIM_ROUNDS) -> dict[str, Any]:
    spec = {"masking": masking, "hospitals": SIM_HOSPITALS, "rounds": rounds}
    run = run_child("bench.secagg", ["--child", json.dumps(spec)], SIM_CAP_S)
    if run.returncode is None:
        return {"ok": False, "reason": f"time cap ({SIM_CAP_S} s)", "wall_s": run.wall_s}
    try:
        result = run.last_json()
    except (ValueError, IndexError):
        return {"ok": False, "reason": run.stderr[-2000:], "wall_s": run.wall_s}
    ok = (
        run.returncode == 0
        and result["status"] == "finished"
        and result["rounds"] == rounds
        and len(result["round_s"]) == rounds
        and (result["unmask_answers"] > 0) == masking
    )
    out = {**result, "ok": ok, "child_wall_s": run.wall_s}
    if not ok:
        out["reason"] = "; ".join(result.get("round_failures", [])[-3:]) + run.stderr[-2000:]
    return out


def _simulations(quick: bool) -> dict[str, Any]:
    repeats = QUICK_SIM_REPEATS if quick else SIM_REPEATS
    rounds = QUICK_SIM_ROUNDS if quick else SIM_ROUNDS
    jobs: dict[str, list[dict[str, Any]]] = {"masked": [], "unmasked": []}
    for i in range(repeats):  # on, off, off, on: both see the same load and the same cold start
        for masking in (True, False) if i % 2 == 0 else (False, True):
            jobs["masked" if masking else "unmasked"].append(_sim_job(masking, rounds))
    out: dict[str, Any] = {"hospitals": SIM_HOSPITALS, "rounds": rounds, "jobs": jobs}
    for name, runs in jobs.items():
        good = [r for r in runs if r["ok"]]
        out[f"{name}_round_s"] = min((r["round_s"][-1] for r in good), default=None)
        out[f"{name}_wall_s"] = min((r["wall_s"] for r in good), default=None)
    return out


def _deployed_job(masking: bool, work: Path) -> dict[str, Any]:
    import statistics

    from fedvault.app.demo import JOB_NAME
    from fedvault.coordinator.store import DEFAULT_STORE_FILENAME, RoundStore, sqlite_url

    out = work / ("masked" if masking else "unmasked")
    flag = "--masking" if masking else "--no-masking"
    args = ["demo", "--out", str(out), "--rounds", str(DEPLOY_ROUNDS), flag]
    run = run_child("fedvault", args, DEPLOY_CAP_S)
    result: dict[str, Any] = {"masking": masking, "wall_s": run.wall_s, "rc": run.returncode}
    try:
        with RoundStore(sqlite_url(out / "coordinator" / DEFAULT_STORE_FILENAME)) as store:
            job = store.get_job(JOB_NAME)
            assert job is not None, f"no job {JOB_NAME!r} in the demo's store"
            views = [v for v in store.rounds(job.id) if v.status == "committed"]
    except Exception as exc:  # no store or no job: this job failed, with the reason
        return {**result, "ok": False, "reason": f"{exc!r}; {run.stderr[-1500:]}"}
    stamps = [v.committed_at.timestamp() for v in views if v.committed_at is not None]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    ok = run.returncode == 0 and len(stamps) == DEPLOY_ROUNDS
    result.update(ok=ok, committed=len(stamps), gaps_s=gaps)
    result["round_s"] = statistics.median(gaps) if ok and gaps else None
    if not ok:
        result["reason"] = run.stderr[-1500:]
    return result


def _deployed(quick: bool) -> dict[str, Any]:
    if quick:
        return {"skipped": "full mode only (fedvault demo runs for minutes)"}
    with tempfile.TemporaryDirectory(prefix="bench-secagg-demo-") as tmp:
        jobs = {
            "masked": _deployed_job(True, Path(tmp)),
            "unmasked": _deployed_job(False, Path(tmp)),
        }
    return {"rounds": DEPLOY_ROUNDS, "jobs": jobs}


# --- the section ------------------------------------------------------------------------


def _judge(quick: bool, value: float | None, target: float) -> bool | None:
    return None if quick or value is None else value <= target


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _round_rows(res: dict[str, Any], quick: bool) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    keys: dict[str, Any] = {}
    size = res["params"]
    hospital: list[float] = []
    sent: list[float] = []
    correction: list[float] = []
    dropped: list[float] = []
    for n, r in res["n"].items():
        hospital.append(r["hospital_ratio"])
        sent.append(r["bytes_ratio"])
        keys[f"secagg_hospital_ratio_{n}"] = r["hospital_ratio"]
        keys[f"secagg_hospital_s_{n}"] = r["hospital_masked_s"]
        keys[f"baseline_secagg_encrypt_s_{n}"] = r["hospital_plain_s"]
        keys[f"secagg_bytes_ratio_{n}"] = r["bytes_ratio"]
        keys[f"secagg_bytes_{n}"] = r["bytes"]["sent_masked"]
        keys[f"baseline_secagg_bytes_{n}"] = r["bytes"]["sent_unmasked"]
        rows.append(
            Row(
                f"secagg: hospital, mask+encrypt+unmask answer vs encrypt, n={n}, {size:,} params",
                r["hospital_masked_s"],
                r["hospital_plain_s"],
                "s",
                f"<= {TARGET_HOSPITAL}x",
                _judge(quick, r["hospital_ratio"], TARGET_HOSPITAL),
            )
        )
        rows.append(
            Row(
                f"  bytes a hospital sends per round, masked vs unmasked, n={n}",
                r["bytes"]["sent_masked"],
                r["bytes"]["sent_unmasked"],
                "B",
                f"<= {TARGET_BYTES}x",
                _judge(quick, r["bytes_ratio"], TARGET_BYTES),
            )
        )
        for d, c in r["coordinator"].items():
            exact = "" if c["exact"] else " (NOT EXACT, see details)"
            target = TARGET_CORRECTION if d == "0" else TARGET_CORRECTION_DROPPED
            suffix = "" if d == "0" else f"_dropped_{d}"
            (correction if d == "0" else dropped).append(c["ratio"])
            keys[f"secagg_correction_ratio_{n}{suffix}"] = c["ratio"]
            keys[f"secagg_correction_s_{n}{suffix}"] = c["correction_s"]
            keys[f"baseline_secagg_aggregate_s_{n}{suffix}"] = c["aggregate_s"]
            rows.append(
                Row(
                    f"  coordinator: correction vs aggregation, n={n}, {d} dropped{exact}",
                    c["correction_s"],
                    c["aggregate_s"],
                    "s",
                    f"<= {target}x",
                    _judge(quick, c["ratio"], target) if c["exact"] else False,
                )
            )
    keys["secagg_hospital_ratio"] = max(hospital)
    keys["secagg_bytes_ratio"] = max(sent)
    keys["secagg_correction_ratio"] = max(correction)
    keys["secagg_correction_ratio_dropped"] = max(dropped, default=None)
    return rows, keys


def _sim_rows(sim: dict[str, Any], quick: bool) -> tuple[list[Row], dict[str, Any]]:
    masked, unmasked = sim["masked_round_s"], sim["unmasked_round_s"]
    ratio = _ratio(masked, unmasked)
    failed = "" if ratio is not None else " (a job failed, see details)"
    rows = [
        Row(
            f"secagg: simulated round (breast-cancer, {SIM_HOSPITALS} hospitals, round "
            f"{sim['rounds']} of {sim['rounds']}), masking on vs off{failed}",
            masked,
            unmasked,
            "s",
            f"<= {TARGET_ROUND}x",
            _judge(quick, ratio, TARGET_ROUND),
            note="fedvault simulate's pipeline, not the deployed demo's processes",
        ),
        Row(
            "  whole simulated job (Ray start-up included), masking on vs off",
            sim["masked_wall_s"],
            sim["unmasked_wall_s"],
            "s",
        ),
    ]
    keys = {
        "secagg_round_ratio": ratio,
        "secagg_round_s": masked,
        "baseline_secagg_round_s": unmasked,
    }
    return rows, keys


def _deploy_rows(dep: dict[str, Any], quick: bool) -> tuple[list[Row], dict[str, Any]]:
    if "jobs" not in dep:
        return [], {}
    jobs = dep["jobs"]
    masked, unmasked = jobs["masked"].get("round_s"), jobs["unmasked"].get("round_s")
    ratio = _ratio(masked, unmasked)
    failed = "" if ratio is not None else " (a demo failed, see details)"
    rows = [
        Row(
            f"secagg: deployed demo round (3 hospital daemons, TLS, median of rounds 2-"
            f"{DEPLOY_ROUNDS}), masking on vs off{failed}",
            masked,
            unmasked,
            "s",
            f"<= {TARGET_ROUND}x",
            _judge(quick, ratio, TARGET_ROUND),
        )
    ]
    keys = {
        "secagg_deploy_round_ratio": ratio,
        "secagg_deploy_round_s": masked,
        "baseline_secagg_deploy_round_s": unmasked,
    }
    return rows, keys


def _noise_rows(noise: dict[str, Any], quick: bool) -> tuple[list[Row], dict[str, Any]]:
    ratio = noise["secure_vs_fast"]
    rows = [
        Row(
            f"crypto noise: DP-SGD step, CSPRNG vs torch's generator, digits CNN (batch "
            f"{noise['batch']})",
            noise["secure_step_s"] * 1e3,
            noise["fast_step_s"] * 1e3,
            "ms",
            f"<= {TARGET_NOISE}x",
            _judge(quick, ratio, TARGET_NOISE),
        ),
        *(
            Row(
                f"  noise draw, {name} values: CSPRNG vs torch.normal",
                v["secure_s"] * 1e3,
                v["fast_s"] * 1e3,
                "ms",
            )
            for name, v in noise["noise_draw"].items()
        ),
    ]
    keys = {
        "crypto_noise_step_ratio": ratio,
        "crypto_noise_step_s": noise["secure_step_s"],
        "baseline_crypto_noise_step_s": noise["fast_step_s"],
        **{f"crypto_noise_draw_ratio_{k}": v["ratio"] for k, v in noise["noise_draw"].items()},
    }
    return rows, keys


def run(quick: bool = False) -> Section:
    """Section ``secagg``: masking's cost to hospitals, coordinator and a round; CSPRNG noise."""
    from bench.dp_step import secure_noise_cost

    rounds = _rounds(quick)
    noise = secure_noise_cost(quick)
    sim = _simulations(quick)
    deployed = _deployed(quick)
    details = {"round": rounds, "noise": noise, "simulation": sim, "deployed": deployed}
    section = Section(name="secagg", details=details)
    for rows, keys in (
        _round_rows(rounds, quick),
        _sim_rows(sim, quick),
        _deploy_rows(deployed, quick),
        _noise_rows(noise, quick),
    ):
        section.rows += rows
        section.keys.update(keys)
    return section


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.secagg")
    parser.add_argument("--child", help="run one simulated job (a JSON spec), print its result")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child)), default=str))
    else:
        section = run(args.quick)
        print(json.dumps({"keys": section.keys, "details": section.details}, default=str))


if __name__ == "__main__":
    # Run the *imported* module's main: Ray pickles ``__main__``'s classes by value.
    from bench.secagg import main as _main

    _main(sys.argv[1:])
