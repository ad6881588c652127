"""Measurement 1: the encrypted update path for a 1,000,000-parameter update.

Ours (``fedvault.privacy.he`` through its public API, exactly as the client and
coordinator call it: BFV, N = 4096, one 60-bit data prime, fixed point at
2**-16, seed-compressed symmetric ciphertexts) against the common choice in
other FL systems: TenSEAL CKKS with N = 8192, coefficient modulus [60, 40, 40, 60], scale 2**40, one
``CKKSVector`` per layer-sized chunk. Both sides weight by the sample count
before encrypting, so the coordinator only adds.

The error of the decrypted aggregate is compared with the DP noise of the
round (see :func:`dp_noise_std`): the bound the project holds itself to is
"below 1 % of one round's DP noise standard deviation".
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import tenseal as ts

from bench.common import Row, Section, best_of, make_updates, timed
from fedvault.privacy.dp import PrivacyConfig, plan_dp
from fedvault.privacy.he import Aggregator, decrypt_average, decrypt_update, encrypt_update
from fedvault.privacy.he_context import HeContext

# Wall time: aggregation loads chunks in worker processes, which a thread-CPU
# clock would not see.
WALL = time.perf_counter

__all__ = ["dp_noise_std", "run"]

PARAMS = 1_000_000
QUICK_PARAMS = 20_000  # --quick: five BFV chunks, still split across chunks and layers
UPDATES = 10


def dp_noise_std(hospitals: int = UPDATES) -> dict[str, float]:
    """The DP noise standard deviation of one round of the digits job (its defaults, epsilon 3).

    DP-SGD adds N(0, (sigma C)^2) to the *sum* of a batch's clipped gradients
    and divides by the expected batch size B, then steps by the learning rate
    lr: every parameter of a hospital's model moves by noise of standard
    deviation ``lr * sigma * C / B`` per step. FedAvg over K hospitals with
    weights w_k averages K independent noises, leaving
    ``lr * sigma * C / B * sqrt(sum w_k^2)`` >= ``lr * sigma * C / (B sqrt(K))``
    (equality for equal weights). More local steps or momentum only add noise,
    so one step of K equal hospitals is the *smallest* noise a round can have:
    the conservative reference for "error below 1 % of the DP noise".
    """
    from fedvault.examples.digits import EXAMPLE

    d = EXAMPLE.defaults
    rounds = 10
    records = 1437 // hospitals  # digits' training split, shared evenly
    batch = min(d.batch_size, records)
    lr, clip = d.learning_rate, d.max_grad_norm
    plan = plan_dp(
        PrivacyConfig(epsilon=3.0, delta=1e-5, max_grad_norm=clip),
        num_samples=records,
        batch_size=batch,
        local_epochs=d.local_epochs,
        rounds=rounds,
    )
    per_step = lr * plan.noise_multiplier * clip / batch
    return {
        "learning_rate": lr,
        "batch_size": batch,
        "max_grad_norm": clip,
        "noise_multiplier": plan.noise_multiplier,
        "per_hospital_step_std": per_step,
        "round_std_lower_bound": per_step / math.sqrt(hospitals),
    }


def _expected(updates: list[dict[str, np.ndarray]], weights: list[float]) -> np.ndarray:
    total = sum(weights)
    acc = np.zeros(sum(v.size for v in updates[0].values()), dtype=np.float64)
    for update, w in zip(updates, weights, strict=True):
        acc += w * np.concatenate([v.reshape(-1).astype(np.float64) for v in update.values()])
    return acc / total


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).reshape(-1) for v in arrays.values()])


def measure_ours(
    size: int, updates: list[dict[str, np.ndarray]], weights: list[float], repeats: int = 3
) -> dict[str, Any]:
    """Encrypt, aggregate, decrypt through fedvault's public API; best of ``repeats``."""
    secret = HeContext.generate()
    public = secret.public()
    job, rnd = "bench", 1

    def encrypt_one() -> bytes:
        return encrypt_update(
            secret, updates[0], weight=weights[0], key_epoch=0, job=job, server_round=rnd
        )

    enc_s, first = best_of(encrypt_one, repeats=repeats, clock=WALL)
    envelopes = [first] + [
        encrypt_update(secret, u, weight=w, key_epoch=0, job=job, server_round=rnd)
        for u, w in zip(updates[1:], weights[1:], strict=True)
    ]

    def aggregate(processes: int | None = None) -> bytes:
        agg = Aggregator(public, key_epoch=0, job=job, server_round=rnd, processes=processes)
        for env in envelopes:
            agg.add(env)
        return agg.result()

    # The first aggregation of a coordinator process starts its worker processes
    # (once: they serve every later round); it is reported apart, and the key is
    # the best of the later ones, interleaved with the one-process sum.
    first_s, result = timed(aggregate, WALL)
    agg_s = one_s = math.inf
    for _ in range(repeats):
        seconds, again = timed(aggregate, WALL)
        agg_s = min(agg_s, seconds)
        seconds, alone = timed(lambda: aggregate(processes=1), WALL)
        one_s = min(one_s, seconds)
        if not result == again == alone:
            raise AssertionError("the aggregate differs between runs or process counts")
    dec_s, _ = best_of(
        lambda: decrypt_average(secret, result, key_epoch=0), repeats=min(repeats, 2), clock=WALL
    )
    # The error of the aggregate itself (float64), before the cast back to float32.
    sums, total = decrypt_update(secret, result, key_epoch=0)
    error = float(np.max(np.abs(_flat(sums) / total - _expected(updates, weights))))
    return {
        "params": size,
        "encrypt_s": enc_s,
        "encrypt_params_per_s": size / enc_s,
        "update_bytes": len(first),
        "expansion": len(first) / (4 * size),
        "aggregate_bytes": len(result),
        "aggregate_expansion": len(result) / (4 * size),
        "aggregate_s": agg_s,
        "aggregate_first_s": first_s,
        "aggregate_one_process_s": one_s,
        "aggregate_processes": len(os.sched_getaffinity(0)),
        "decrypt_s": dec_s,
        "decrypt_params_per_s": size / dec_s,
        "max_abs_error": error,
        "params_set": repr(secret.params),
    }


def _tenseal_context() -> ts.Context:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40, 60])
    ctx.global_scale = 2.0**40
    return ctx


def measure_tenseal(
    size: int, updates: list[dict[str, np.ndarray]], weights: list[float]
) -> dict[str, Any]:
    """The common choice: one TenSEAL CKKSVector per layer, N = 8192, [60, 40, 40, 60]."""
    secret = _tenseal_context()
    public = secret.copy()
    public.make_context_public()

    def encrypt(update: dict[str, np.ndarray], weight: float) -> list[bytes]:
        return [
            ts.ckks_vector(secret, (v.reshape(-1).astype(np.float64) * weight).tolist()).serialize()
            for v in update.values()
        ]

    enc_s, first = timed(lambda: encrypt(updates[0], weights[0]), WALL)
    blobs = [first] + [encrypt(u, w) for u, w in zip(updates[1:], weights[1:], strict=True)]

    def aggregate() -> list[bytes]:
        acc: list[Any] | None = None
        for layers in blobs:
            vecs = [ts.ckks_vector_from(public, b) for b in layers]
            if acc is None:
                acc = vecs
            else:
                for a, v in zip(acc, vecs, strict=True):
                    a += v
        assert acc is not None
        return [v.serialize() for v in acc]

    agg_s, result = timed(aggregate, WALL)
    total = sum(weights)

    def decrypt() -> np.ndarray:
        return np.concatenate(
            [np.asarray(ts.ckks_vector_from(secret, b).decrypt()) / total for b in result]
        )

    dec_s, average = timed(decrypt, WALL)
    error = float(np.max(np.abs(average - _expected(updates, weights))))
    update_bytes = sum(len(b) for b in first)
    return {
        "params": size,
        "encrypt_s": enc_s,
        "encrypt_params_per_s": size / enc_s,
        "update_bytes": update_bytes,
        "expansion": update_bytes / (4 * size),
        "aggregate_s": agg_s,
        "decrypt_s": dec_s,
        "decrypt_params_per_s": size / dec_s,
        "max_abs_error": error,
    }


def run(quick: bool = False) -> Section:
    """Both sides on the same updates; the JSON keys of measurement 1."""
    size = QUICK_PARAMS if quick else PARAMS
    updates, weights = make_updates(UPDATES, size)
    ours = measure_ours(size, updates, weights, repeats=1 if quick else 3)
    base = measure_tenseal(size, updates, weights)
    noise = dp_noise_std()
    bound = 0.01 * noise["round_std_lower_bound"]
    scale = PARAMS / size  # aggregation time is linear in the size
    section = Section(name="he")
    section.keys = {
        "he_expansion": ours["expansion"],
        "he_encrypt_params_per_s": ours["encrypt_params_per_s"],
        "he_aggregate_10x1M_s": ours["aggregate_s"] * scale,
        "he_max_abs_error": ours["max_abs_error"],
        "he_decrypt_params_per_s": ours["decrypt_params_per_s"],
        "he_aggregate_expansion": ours["aggregate_expansion"],
        "he_error_bound_1pct_dp_noise": bound,
        "baseline_he_expansion": base["expansion"],
        "baseline_he_encrypt_params_per_s": base["encrypt_params_per_s"],
        "baseline_he_aggregate_10x1M_s": base["aggregate_s"] * scale,
        "baseline_he_max_abs_error": base["max_abs_error"],
        "baseline_he_decrypt_params_per_s": base["decrypt_params_per_s"],
    }
    section.details = {"ours": ours, "baseline": base, "dp_noise": noise}
    k = section.keys

    def _judge(ok: bool) -> bool | None:
        return None if quick else ok  # quick's sizes are a smoke test, not a measurement

    section.rows = [
        Row(
            "HE expansion (upload bytes / float32)",
            k["he_expansion"],
            k["baseline_he_expansion"],
            "x",
            "<= 3x",
            _judge(k["he_expansion"] <= 3.0),
        ),
        Row(
            "HE client encrypt",
            k["he_encrypt_params_per_s"] / 1e6,
            k["baseline_he_encrypt_params_per_s"] / 1e6,
            "M params/s",
            ">= 2 M/s",
            _judge(k["he_encrypt_params_per_s"] >= 2e6),
            higher_is_better=True,
        ),
        Row(
            "HE aggregate 10 x 1M (incl. parsing)",
            k["he_aggregate_10x1M_s"],
            k["baseline_he_aggregate_10x1M_s"],
            "s",
            "<= 0.5 s",
            _judge(k["he_aggregate_10x1M_s"] <= 0.5),
        ),
        Row(
            "HE decrypt",
            k["he_decrypt_params_per_s"] / 1e6,
            k["baseline_he_decrypt_params_per_s"] / 1e6,
            "M params/s",
            "",
            None,
            higher_is_better=True,
        ),
        Row(
            "HE max abs error of the average",
            k["he_max_abs_error"],
            k["baseline_he_max_abs_error"],
            "",
            f"< {bound:.2e} (1% DP std)",
            _judge(k["he_max_abs_error"] < bound),
        ),
        Row("HE aggregate (download) expansion", k["he_aggregate_expansion"], None, "x", "", None),
    ]
    return section
