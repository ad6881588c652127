"""Cost of SecAgg+ masking on the encrypted path: helpers, and a stand-alone table.

The helpers run one masked round's steps exactly as the product does (the
privacy layer's public API, the consortium's default :class:`SecAggParams`);
``bench/secagg.py`` (section ``secagg`` of ``make bench``) times them against
the unmasked path, and :func:`main` prints a quick table on its own.

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
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

from fedvault.privacy.he import Aggregator, encrypt_update
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.secagg import MaskingSession, RoundContext, SecAggParams, UnmaskingSession
from fedvault.privacy.secagg_he import apply_correction, encrypt_masked_update
from fedvault.privacy.secagg_messages import MaskedShares, UnmaskReply, UnmaskRequest

__all__ = [
    "PARAMS",
    "aggregate",
    "correct",
    "masked_encrypt",
    "most_dropouts",
    "open_unmasking",
    "sessions",
    "unmask_requests",
]

#: The consortium's masking parameters (``client/masking.py`` uses the defaults too).
PARAMS = SecAggParams()


def most_dropouts(n: int) -> int:
    """Dropouts a round of ``n`` hospitals survives: ``k - T`` (0 for n = 3)."""
    k = PARAMS.degree_for(n)
    return k - PARAMS.threshold_for(k)


def sessions(
    n: int, t: int, nonce: bytes, job: str = "bench", server_round: int = 1
) -> tuple[dict[str, MaskingSession], RoundContext]:
    """``n`` hospitals' masking sessions of one round (fresh X25519 keys), and its context."""
    names = tuple(f"h{i:02d}" for i in range(n))
    keys = {p: x25519.X25519PrivateKey.generate() for p in names}
    peers = {p: k.public_key() for p, k in keys.items()}
    context = RoundContext(job, server_round, names, nonce)
    return {p: MaskingSession(context, p, keys[p], peers, PARAMS, t) for p in names}, context


def masked_encrypt(
    ctx: HeContext,
    session: MaskingSession,
    model: Mapping[str, np.ndarray],
    weight: float,
    job: str = "",
    server_round: int = 0,
) -> tuple[bytes, MaskedShares]:
    """A hospital's masked update, as ``client/masking.masked_update`` makes it.

    Key agreement with every neighbour, the self-mask seed's Shamir shares (sealed),
    the masks expanded and added while encrypting: the envelope and the shares.
    """
    envelope = encrypt_masked_update(
        ctx, model, mask=session.mask_stream(), weight=weight, job=job, server_round=server_round
    )
    return envelope, session.shares


def open_unmasking(
    context: RoundContext, shares: Iterable[MaskedShares], t: int
) -> UnmaskingSession:
    """The coordinator's session once the survivors' shares are in and it is closed."""
    coord = UnmaskingSession(context, PARAMS, t)
    for s in shares:
        coord.add_masked(s)
    coord.close()
    return coord


def unmask_requests(coord: UnmaskingSession) -> dict[str, UnmaskRequest]:
    """The coordinator's unmask request to every survivor."""
    return {v: coord.request_for(v) for v in coord.survivors}


def correct(
    pub: HeContext, total: bytes, coord: UnmaskingSession, replies: Iterable[UnmaskReply]
) -> bytes:
    """The coordinator's last step: check the replies, rebuild the masks, correct the sum."""
    for reply in replies:
        coord.add_reply(reply)
    return apply_correction(pub, total, coord.correction_stream())


def aggregate(pub: HeContext, envelopes: Iterable[bytes]) -> bytes:
    """The coordinator's encrypted sum, as ``SecureFedAvg`` streams it (one add per reply)."""
    agg = Aggregator(pub)
    for env in envelopes:
        agg.add(env)
    return agg.result()


# --- the stand-alone table ---------------------------------------------------------------


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _correction(n: int, dropouts: int, size: int, t: int) -> Callable[[], object]:
    """The correction stream alone (no BFV): ``size`` values, ``dropouts`` dropped."""
    masking, context = sessions(n, t, f"c{n}-{dropouts}".encode())
    for s in masking.values():
        s.mask_stream()  # the coordinator's cost does not depend on the vectors
    survivors = list(masking)[dropouts:]
    coord = open_unmasking(context, (masking[p].shares for p in survivors), t)
    for v, request in unmask_requests(coord).items():
        coord.add_reply(masking[v].unmask_reply(request))
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
        fresh = [sessions(n, t, f"m{i}".encode())[0]["h00"] for i in range(repeat)]
        mask_s = min(_best(lambda s=s: s.mask(x), 1) for s in fresh)  # one session, once
        most = most_dropouts(n)
        c0 = _best(_correction(n, 0, size, t), 1)
        cmax = _best(_correction(n, most, size, t), 1)
        print(
            f"n={n:2d}: mask {mask_s:.3f}s   correction, 0 dropped {c0:.3f}s, "
            f"{most} dropped {cmax:.3f}s"
        )
    model = {"w": rng.standard_normal(size).astype(np.float32)}
    masking, context = sessions(5, t, b"he")
    plain = _best(lambda: encrypt_update(ctx, model, weight=3.0), repeat)
    start = time.perf_counter()
    sent = [masked_encrypt(ctx, s, model, weight=3.0) for s in masking.values()]
    masked = (time.perf_counter() - start) / len(masking)
    total = aggregate(pub, (env for env, _ in sent))
    coord = open_unmasking(context, (shares for _, shares in sent), t)
    replies = [masking[v].unmask_reply(r) for v, r in unmask_requests(coord).items()]
    start = time.perf_counter()
    correct(pub, total, coord, replies)
    corr = time.perf_counter() - start
    print(
        f"BFV, n=5: encrypt_update {plain:.3f}s, encrypt_masked_update {masked:.3f}s, "
        f"apply_correction (incl. the correction) {corr:.3f}s"
    )


if __name__ == "__main__":
    main()
