"""Cost of SecAgg+ masking on the encrypted path (not wired into ``bench.run`` yet).

``.venv/bin/python -m bench.secagg_cost [--size 1000000] [--repeat 3]`` prints, per
round size n (complete graph, default threshold):

* mask: one hospital masking a ``size``-integer fixed-point vector (n - 1 pairwise
  streams + its self mask), key agreement and Shamir sharing included;
* correction: the coordinator's correction for ``size`` values with 0 and with the
  most tolerated dropouts (share reconstruction and seed checks included);
* encrypt: ``encrypt_update`` vs ``encrypt_masked_update`` of a ``size``-value model,
  and ``apply_correction`` on the aggregate (real BFV, the default 4096-slot context).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

from fedvault.privacy.he import Aggregator, encrypt_update
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.secagg import MaskingSession, RoundContext, SecAggParams, UnmaskingSession
from fedvault.privacy.secagg_he import apply_correction, encrypt_masked_update


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _sessions(n: int, t: int, nonce: bytes) -> tuple[dict[str, MaskingSession], RoundContext]:
    names = tuple(f"h{i:02d}" for i in range(n))
    keys = {p: x25519.X25519PrivateKey.generate() for p in names}
    peers = {p: k.public_key() for p, k in keys.items()}
    context = RoundContext("bench", 1, names, nonce)
    params = SecAggParams()
    return {p: MaskingSession(context, p, keys[p], peers, params, t) for p in names}, context


def _correction(n: int, dropouts: int, size: int, t: int, x: np.ndarray) -> Callable[[], object]:
    sessions, context = _sessions(n, t, f"c{n}-{dropouts}".encode())
    for s in sessions.values():
        s.mask_stream()  # the coordinator's cost does not depend on the vectors
    coord = UnmaskingSession(context, SecAggParams(), t)
    survivors = list(sessions)[dropouts:]
    for p in survivors:
        coord.add_masked(sessions[p].shares)
    coord.close()
    for v in survivors:
        coord.add_reply(sessions[v].unmask_reply(coord.request_for(v)))
    return lambda: coord.correction_stream().take(size)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size, repeat = args.size, args.repeat
    ctx = HeContext.generate()
    pub, t = ctx.public(), ctx.params.plain_modulus
    rng = np.random.default_rng(0)
    x = np.rint(rng.standard_normal(size) * 2.0**16).astype(np.int64)
    print(f"{size} values, t = {t} ({t.bit_length()} bits)")
    for n in (3, 5, 10):
        fresh = [_sessions(n, t, f"m{i}".encode())[0]["h00"] for i in range(repeat)]
        mask_s = min(_best(lambda s=s: s.mask(x), 1) for s in fresh)  # one session, once
        k = n - 1
        most = k - SecAggParams().threshold_for(k)
        c0 = _best(_correction(n, 0, size, t, x), 1)
        cmax = _best(_correction(n, most, size, t, x), 1)
        print(
            f"n={n:2d}: mask {mask_s:.3f}s   correction, 0 dropped {c0:.3f}s, "
            f"{most} dropped {cmax:.3f}s"
        )
    model = {"w": rng.standard_normal(size).astype(np.float32)}
    sessions, context = _sessions(5, t, b"he")
    plain = _best(lambda: encrypt_update(ctx, model, weight=3.0), repeat)
    envs = {}
    start = time.perf_counter()
    for p, s in sessions.items():
        envs[p] = encrypt_masked_update(ctx, model, mask=s.mask_stream(), weight=3.0)
    masked = (time.perf_counter() - start) / len(sessions)
    coord = UnmaskingSession(context, SecAggParams(), t)
    agg = Aggregator(pub)
    for p, s in sessions.items():
        coord.add_masked(s.shares)
        agg.add(envs[p])
    coord.close()
    for v in coord.survivors:
        coord.add_reply(sessions[v].unmask_reply(coord.request_for(v)))
    total = agg.result()
    start = time.perf_counter()
    apply_correction(pub, total, coord.correction_stream())
    corr = time.perf_counter() - start
    print(
        f"BFV, n=5: encrypt_update {plain:.3f}s, encrypt_masked_update {masked:.3f}s, "
        f"apply_correction (incl. the correction) {corr:.3f}s"
    )


if __name__ == "__main__":
    main()
