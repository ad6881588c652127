"""What each lever on the encrypted path gives, measured one at a time.

Every row changes one thing against a named reference, on the same data, and
uses only what TenSEAL and the SEAL it wraps provide (no hand-made crypto):

* **modulus chain** — TenSEAL CKKS slots with [60,40,40,60] (the common
  choice), [60,40,60] (fedvault's format 1) and [60,60]: bytes per value;
* **scheme** — BFV batching (N integers per ciphertext) vs CKKS slots (N/2
  reals) under the same single data prime;
* **symmetric, seed-compressed** encryption vs public-key encryption: bytes
  and throughput;
* **fixed point** — the error the 2**-16 rounding leaves vs 1 % of the DP noise;
* **two values per slot** (23-bit fields): half the bytes again, but only when
  weights are normalised by a total the coordinator announces (dropped);
* **one encryption process per core** (dropped: hospitals' cores train);
* **parallel chunk loading** at the coordinator (kept);
* **streaming in-place accumulation** vs allocating a new sum per update (kept);
* **partial encryption** of a layer list (what it saves, and what it leaks).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from bench.common import Row, Section, best_of, make_updates
from bench.he_path import dp_noise_std
from fedvault.privacy import seal_bytes
from fedvault.privacy.fixed_point import FixedPoint
from fedvault.privacy.he import Aggregator, decrypt_update, encrypt_update, parse_envelope
from fedvault.privacy.he_context import HeContext

# Wall time: the encrypted path uses threads (chunk loading) and processes (a
# lever), which a thread-CPU clock would not see.
WALL = time.perf_counter

__all__ = ["run"]


def _ckks_bytes_per_value(bits: list[int], repeats: int) -> dict[str, float]:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=bits)
    ctx.global_scale = 2.0**40 if len(bits) > 2 else 2.0**30
    values = np.random.default_rng(0).standard_normal(4096 * 8).tolist()
    seconds, vec = best_of(lambda: ts.ckks_vector(ctx, values), repeats=repeats, clock=WALL)
    size = len(vec.serialize())
    return {"expansion": size / len(values) / 4, "encrypt_params_per_s": len(values) / seconds}


def _bfv_public_bytes(ctx: HeContext, size: int, repeats: int) -> dict[str, float]:
    update = {"u": np.zeros(size, dtype=np.float32)}
    public = ctx.public()
    seconds, data = best_of(
        lambda: encrypt_update(public, update, weight=1.0), repeats=repeats, clock=WALL
    )
    return {"expansion": len(data) / (4 * size), "encrypt_params_per_s": size / seconds}


def _bfv_symmetric(ctx: HeContext, size: int, repeats: int) -> dict[str, float]:
    update = {"u": np.zeros(size, dtype=np.float32)}
    seconds, data = best_of(
        lambda: encrypt_update(ctx, update, weight=1.0), repeats=repeats, clock=WALL
    )
    return {"expansion": len(data) / (4 * size), "encrypt_params_per_s": size / seconds}


def _two_per_slot(ctx: HeContext, updates: list[Any], weights: list[float]) -> dict[str, float]:
    """Two signed 23-bit fields per slot, weights normalised by the round's total.

    ``lo + hi * 2**23`` with both fields carrying ``round(w / W * x * 2**14)``:
    exact only while every field's sum stays below 2**22, which needs the
    coordinator to announce W before the round and bounds |x| < 2**7.
    """
    total = sum(weights)
    field, frac = 23, 14
    flats = [
        np.concatenate([v.reshape(-1).astype(np.float64) for v in u.values()]) for u in updates
    ]
    n = ctx.params.slots
    half = -(-flats[0].size // 2)
    chunks = -(-half // n)
    acc: list[Any] | None = None
    sizes = 0
    encoder, evaluator = ctx.encoder, ctx.evaluator
    for flat, w in zip(flats, weights, strict=True):
        q = np.zeros(2 * half, dtype=np.int64)
        q[: flat.size] = np.rint(flat * (w / total) * 2.0**frac)
        packed = q[:half] + q[half:] * (1 << field)
        cts = []
        plain = sealapi.Plaintext()
        for c in range(chunks):
            encoder.encode(packed[c * n : (c + 1) * n].tolist(), plain)
            blob = seal_bytes.dump(ctx.secret_encryptor.encrypt_symmetric(plain))
            sizes += len(blob) if acc is None else 0
            cts.append(seal_bytes.load_ciphertext(ctx.seal, blob))
        if acc is None:
            acc = cts
        else:
            for a, b in zip(acc, cts, strict=True):
                evaluator.add_inplace(a, b)
    assert acc is not None
    out = np.empty(chunks * n, dtype=np.int64)
    plain = sealapi.Plaintext()
    for c, ct in enumerate(acc):
        ctx.decryptor.decrypt(ct, plain)
        out[c * n : (c + 1) * n] = encoder.decode_int64(plain)
    out = out[:half]
    lo = ((out + (1 << (field - 1))) % (1 << field)) - (1 << (field - 1))
    hi = (out - lo) >> field
    average = np.concatenate([lo, hi])[: flats[0].size] / 2.0**frac
    exact = sum(w * f for f, w in zip(flats, weights, strict=True)) / total
    return {
        "expansion": sizes / (4 * flats[0].size),
        "max_abs_error": float(np.max(np.abs(average - exact))),
    }


def _encrypt_chunk_range(args: tuple[bytes, np.ndarray]) -> int:
    secret_bytes, values = args
    ctx = HeContext.from_bytes(secret_bytes)
    return len(encrypt_update(ctx, {"u": values}, weight=1.0))


def _processes_per_core(ctx: HeContext, size: int, repeats: int) -> dict[str, float]:
    workers = os.cpu_count() or 1
    values = np.random.default_rng(1).standard_normal(size)
    secret = ctx.serialize_secret()
    parts = np.array_split(values, workers)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_encrypt_chunk_range, [(secret, p[:10]) for p in parts]))  # warm up
        parallel_s, _ = best_of(
            lambda: list(pool.map(_encrypt_chunk_range, [(secret, p) for p in parts])),
            repeats=repeats,
            clock=WALL,
        )
    serial_s, _ = best_of(
        lambda: encrypt_update(ctx, {"u": values}, weight=1.0), repeats=repeats, clock=WALL
    )
    return {
        "workers": workers,
        "one_process_params_per_s": size / serial_s,
        "per_core_params_per_s": size / parallel_s,
    }


def _aggregate(
    public: HeContext, envelopes: list[bytes], repeats: int, loader_threads: int | None = None
) -> float:
    def run() -> bytes:
        agg = Aggregator(public, loader_threads=loader_threads)
        for env in envelopes:
            agg.add(env)
        return agg.result()

    seconds, _ = best_of(run, repeats=repeats, clock=WALL)
    return seconds


def _loader_threads(public: HeContext, envelopes: list[bytes], repeats: int) -> dict[str, float]:
    threaded = _aggregate(public, envelopes, repeats)
    single = _aggregate(public, envelopes, repeats, loader_threads=1)
    return {"threads": os.cpu_count() or 1, "threaded_s": threaded, "one_thread_s": single}


def _sum_loaded(
    public: HeContext, envelopes: list[bytes], repeats: int, *, in_place: bool
) -> float:
    """Load every chunk and sum: ``add_inplace`` (ours) or ``add`` into a new ciphertext."""
    ctx = public

    def run() -> list[Any]:
        acc: list[Any] | None = None
        for env in envelopes:
            cts = [seal_bytes.load_ciphertext(ctx.seal, c) for c in parse_envelope(env).chunks]
            if acc is None:
                acc = cts
            elif in_place:
                for a, b in zip(acc, cts, strict=True):
                    ctx.evaluator.add_inplace(a, b)
            else:
                fresh = []
                for a, b in zip(acc, cts, strict=True):
                    out = sealapi.Ciphertext()
                    ctx.evaluator.add(a, b, out)
                    fresh.append(out)
                acc = fresh
        assert acc is not None
        return acc

    seconds, _ = best_of(run, repeats=repeats, clock=WALL)
    return seconds


def run(quick: bool = False) -> Section:
    size = 20_000 if quick else 500_000
    reps = 1 if quick else 3  # best of, per timing
    ctx = HeContext.generate()
    public = ctx.public()
    updates, weights = make_updates(10, size)
    envelopes = [encrypt_update(ctx, u, weight=w) for u, w in zip(updates, weights, strict=True)]
    bound = 0.01 * dp_noise_std()["round_std_lower_bound"]
    sums, total = decrypt_update(ctx, _sum(public, envelopes))
    exact = sum(
        w * np.concatenate([v.reshape(-1).astype(np.float64) for v in u.values()])
        for u, w in zip(updates, weights, strict=True)
    ) / sum(weights)
    ours_error = float(
        np.max(np.abs(np.concatenate([s.reshape(-1) for s in sums.values()]) / total - exact))
    )

    d: dict[str, Any] = {
        "chain_ckks_60_40_40_60": _ckks_bytes_per_value([60, 40, 40, 60], reps),
        "chain_ckks_60_40_60": _ckks_bytes_per_value([60, 40, 60], reps),
        "chain_ckks_60_60": _ckks_bytes_per_value([60, 60], reps),
        "bfv_public_key": _bfv_public_bytes(ctx, size, reps),
        "bfv_symmetric_seeded": _bfv_symmetric(ctx, size, reps),
        "fixed_point": {
            "max_abs_error": ours_error,
            "worst_case_bound": FixedPoint().max_error,
            "one_percent_dp_noise": bound,
        },
        "two_per_slot": _two_per_slot(ctx, updates, weights),
        "process_per_core": _processes_per_core(ctx, size, reps),
        "loader_threads": _loader_threads(public, envelopes, reps),
        "accumulate": {
            "in_place_s": _sum_loaded(public, envelopes, reps, in_place=True),
            "allocating_s": _sum_loaded(public, envelopes, reps, in_place=False),
        },
        # 10 % of the parameters encrypted, 90 % in clear float32 beside them.
        "partial_10pct": {
            "expansion": 0.1 * _bfv_symmetric(ctx, size, reps)["expansion"] + 0.9,
            "leaks": "90% of each hospital's own update reaches the coordinator in clear",
        },
    }
    s = Section(name="levers", details={"levers": d})
    s.keys = {f"lever_{k}": v for k, v in d.items()}
    c4 = d["chain_ckks_60_40_40_60"]["expansion"]
    c3 = d["chain_ckks_60_40_60"]["expansion"]
    c2 = d["chain_ckks_60_60"]["expansion"]
    pk, sym = d["bfv_public_key"], d["bfv_symmetric_seeded"]
    two, proc = d["two_per_slot"], d["process_per_core"]
    thr, acc = d["loader_threads"], d["accumulate"]
    s.rows = [
        Row("lever: chain [60,60] vs [60,40,40,60] (CKKS)", c2, c4, "x bytes", "kept: 1 prime"),
        Row("lever: chain [60,40,60] vs [60,40,40,60]", c3, c4, "x bytes"),
        Row("lever: BFV N ints vs CKKS N/2 slots, 1 prime", pk["expansion"], c2, "x bytes", "kept"),
        Row(
            "lever: seeded symmetric vs public key (bytes)",
            sym["expansion"],
            pk["expansion"],
            "x bytes",
            "kept",
        ),
        Row(
            "lever: symmetric vs public key (encrypt)",
            sym["encrypt_params_per_s"] / 1e6,
            pk["encrypt_params_per_s"] / 1e6,
            "M params/s",
            "kept",
            higher_is_better=True,
        ),
        Row(
            "lever: fixed point 2^-16, max error",
            ours_error,
            bound,
            "",
            "< 1% DP std",
            None if quick else ours_error < bound,
        ),
        Row(
            "lever: 2 values/slot (bytes)", two["expansion"], sym["expansion"], "x bytes", "dropped"
        ),
        Row("lever: 2 values/slot, max error", two["max_abs_error"], bound, "", "dropped"),
        Row(
            f"lever: {proc['workers']} encrypt processes vs 1",
            proc["per_core_params_per_s"] / 1e6,
            proc["one_process_params_per_s"] / 1e6,
            "M params/s",
            "dropped",
            higher_is_better=True,
        ),
        Row(
            f"lever: {thr['threads']} loader threads vs 1 (aggregate)",
            thr["threaded_s"],
            thr["one_thread_s"],
            "s",
            "kept",
        ),
        Row(
            "lever: in-place vs allocating sum", acc["in_place_s"], acc["allocating_s"], "s", "kept"
        ),
        Row(
            "lever: partial encryption 10%",
            d["partial_10pct"]["expansion"],
            sym["expansion"],
            "x bytes",
            "dropped: leaks",
        ),
    ]
    return s


def _sum(public: HeContext, envelopes: list[bytes]) -> bytes:
    agg = Aggregator(public)
    for env in envelopes:
        agg.add(env)
    return agg.result()
