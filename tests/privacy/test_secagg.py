"""Masked updates inside BFV (SecAgg+): exact cancellation, uniformity, dropouts, collusion.

Everything is numeric. Where the acceptance says "decrypt", the updates go through
real BFV (the default 4096-slot context) via the project's HE helpers; the rest runs
the protocol on the integer vectors mod t that BFV would encrypt.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from scipy.stats import chisquare

from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.privacy import secagg
from fedvault.privacy.fixed_point import FixedPoint
from fedvault.privacy.he import Aggregator, decrypt_average, decrypt_update, encrypt_update
from fedvault.privacy.he_context import HeContext, HeParams
from fedvault.privacy.secagg import (
    CoordinatorStage,
    MaskedShares,
    MaskingSession,
    ProtocolError,
    RoundContext,
    SecAggParams,
    Stage,
    UnmaskError,
    UnmaskingSession,
    UnmaskReply,
    UnmaskRequest,
    neighbour_graph,
)
from fedvault.privacy.secagg_he import apply_correction, encrypt_masked_update
from fedvault.privacy.secagg_prg import MaskSum, UniformStream, centred

T_MOD = HeParams().plain_modulus
SPEC = FixedPoint()
JOB, ROUND = "job-1", 4


# --- helpers -------------------------------------------------------------------------


@dataclass
class Round:
    names: tuple[str, ...]
    keys: dict[str, x25519.X25519PrivateKey]
    peers: dict[str, x25519.X25519PublicKey]
    context: RoundContext
    params: SecAggParams
    sessions: dict[str, MaskingSession]


def _round(
    n: int,
    params: SecAggParams | None = None,
    *,
    nonce: bytes = b"instr",
    server_round: int = ROUND,
    keys: Mapping[str, x25519.X25519PrivateKey] | None = None,
) -> Round:
    params = params or SecAggParams()
    names = tuple(f"h{i:02d}" for i in range(n))
    keys = dict(keys) if keys else {p: x25519.X25519PrivateKey.generate() for p in names}
    peers = {p: k.public_key() for p, k in keys.items()}
    context = RoundContext(JOB, server_round, names, nonce)
    sessions = {p: MaskingSession(context, p, keys[p], peers, params, T_MOD) for p in names}
    return Round(names, keys, peers, context, params, sessions)


def _ints(rng: np.random.Generator, size: int, weight: float = 3.0) -> np.ndarray:
    """A fixed-point update as the HE path encodes it: round(w * x * 2**16), signed."""
    return np.rint(rng.standard_normal(size) * weight * 2.0**SPEC.scale_bits).astype(np.int64)


def _roundtrip_reply(session: MaskingSession, request: UnmaskRequest) -> UnmaskReply:
    wire = UnmaskRequest.from_bytes(request.to_bytes())
    reply = UnmaskReply.from_bytes(session.unmask_reply(wire).to_bytes())
    # Never both kinds of secret for one peer, in any reply of any test.
    assert not set(reply.self_shares) & set(reply.seeds)
    return reply


def _unmask(r: Round, arrived: Iterable[str], *, silent: Iterable[str] = ()) -> UnmaskingSession:
    """The coordinator's side: collect the arrived shares, close, ask every survivor but
    the ``silent`` ones, record their replies.
    """
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in arrived:
        coord.add_masked(MaskedShares.from_bytes(r.sessions[p].shares.to_bytes()))
    coord.close()
    for v in coord.survivors:
        if v not in set(silent):
            coord.add_reply(_roundtrip_reply(r.sessions[v], coord.request_for(v)))
    return coord


def _chi2_p(residues: np.ndarray, bins: int = 64) -> float:
    counts = np.bincount(
        (residues.astype(np.uint64) * np.uint64(bins)) // np.uint64(T_MOD), minlength=bins
    )
    return float(chisquare(counts).pvalue)


def _model(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((2, size // 2)).astype(np.float32),
        "b": rng.standard_normal(size - 2 * (size // 2) + 3),
    }


@pytest.fixture(scope="module")
def ctx() -> HeContext:
    return HeContext.generate()


@pytest.fixture(scope="module")
def pub(ctx: HeContext) -> HeContext:
    return ctx.public()


# --- 1. masks cancel exactly ---------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5, 8])
def test_masks_cancel_exactly_in_the_integer_sum(n: int) -> None:
    rng = np.random.default_rng(n)
    r = _round(n)
    xs = {p: _ints(rng, 3000) for p in r.names}
    ys = {p: r.sessions[p].mask(xs[p])[0] for p in r.names}
    for y in ys.values():
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < T_MOD
    coord = _unmask(r, r.names)
    total = sum(ys[p].astype(object) for p in r.names)  # exact, then mod t
    unmasked = centred(
        np.asarray((total - coord.correction(3000).astype(object)) % T_MOD, dtype=np.int64), T_MOD
    )
    np.testing.assert_array_equal(unmasked, sum(xs.values()))
    assert coord.stage is CoordinatorStage.DONE


def test_bfv_aggregate_with_masks_is_byte_identical(ctx: HeContext, pub: HeContext) -> None:
    rng = np.random.default_rng(7)
    r = _round(4)
    models = {p: _model(rng, 6001) for p in r.names}  # 2 ciphertext chunks, a short last one
    weights = {p: float(w) for p, w in zip(r.names, (3, 50, 7, 1234), strict=True)}

    plain = Aggregator(pub, job=JOB, server_round=ROUND)
    masked = Aggregator(pub, job=JOB, server_round=ROUND)
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in r.names:
        plain.add(encrypt_update(ctx, models[p], weight=weights[p], job=JOB, server_round=ROUND))
        env = encrypt_masked_update(
            ctx,
            models[p],
            mask=r.sessions[p].mask_stream(),
            weight=weights[p],
            job=JOB,
            server_round=ROUND,
        )
        masked.add(env)
        coord.add_masked(r.sessions[p].shares)
    coord.close()
    for v in coord.survivors:
        coord.add_reply(_roundtrip_reply(r.sessions[v], coord.request_for(v)))
    corrected = apply_correction(pub, masked.result(), coord.correction_stream())

    want, want_w = decrypt_update(ctx, plain.result())
    got, got_w = decrypt_update(ctx, corrected)
    assert got_w == want_w == sum(weights.values())
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert got[name].tobytes() == want[name].tobytes()
    avg_want, avg_got = decrypt_average(ctx, plain.result()), decrypt_average(ctx, corrected)
    assert all(avg_got[k].tobytes() == avg_want[k].tobytes() for k in avg_want)
    # Without the correction the sum is garbage: the masks really are in there.
    garbage, _ = decrypt_update(ctx, masked.result())
    assert not np.allclose(garbage["b"], want["b"])


# --- 2. a single masked update is uniform mod t ---------------------------------------


def test_one_decrypted_masked_update_is_uniform_the_unmasked_one_is_not(ctx: HeContext) -> None:
    rng = np.random.default_rng(11)
    r = _round(3)
    model = _model(rng, 8190)  # 8193 values: 3 chunks
    env_masked = encrypt_masked_update(
        ctx, model, mask=r.sessions["h00"].mask_stream(), weight=25.0, job=JOB, server_round=ROUND
    )
    env_plain = encrypt_update(ctx, model, weight=25.0, job=JOB, server_round=ROUND)

    def residues(env: bytes) -> np.ndarray:
        values, _ = decrypt_update(ctx, env)  # what a colluding hospital can do
        ints = np.concatenate([np.ldexp(v.reshape(-1), SPEC.scale_bits) for v in values.values()])
        assert np.array_equal(ints, np.rint(ints))
        return np.mod(ints.astype(np.int64), T_MOD)

    assert _chi2_p(residues(env_masked)) > 1e-3
    assert _chi2_p(residues(env_plain)) < 1e-6


# --- 3. dropouts after masking ---------------------------------------------------------


def _masked_round_through_bfv(
    ctx: HeContext, pub: HeContext, r: Round, dropped: Iterable[str], rng: np.random.Generator
) -> tuple[UnmaskingSession, Aggregator, dict[str, dict[str, np.ndarray]]]:
    """Every participant masks and encrypts; only the non-dropped replies arrive."""
    dropped = set(dropped)
    models = {p: _model(rng, 500) for p in r.names}
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    agg = Aggregator(pub, job=JOB, server_round=ROUND)
    for p in r.names:
        env = encrypt_masked_update(
            ctx,
            models[p],
            mask=r.sessions[p].mask_stream(),
            weight=2.0,
            job=JOB,
            server_round=ROUND,
        )
        if p not in dropped:  # the reply of a dropped hospital never arrives
            agg.add(env)
            coord.add_masked(r.sessions[p].shares)
    return coord, agg, models


@pytest.mark.parametrize("dropouts", [0, 1, 2])
def test_rounds_survive_up_to_the_tolerated_dropouts(
    ctx: HeContext, pub: HeContext, dropouts: int
) -> None:
    # 7 hospitals, complete graph: k = 6, default T = 4, so k - T = 2 dropouts.
    r = _round(7)
    assert r.sessions["h00"].threshold == 4
    rng = np.random.default_rng(dropouts)
    dropped = r.names[1 : 1 + dropouts]
    coord, agg, models = _masked_round_through_bfv(ctx, pub, r, dropped, rng)
    coord.close()
    assert coord.dropped == dropped
    for v in coord.survivors:
        coord.add_reply(_roundtrip_reply(r.sessions[v], coord.request_for(v)))
    got, weight = decrypt_update(
        ctx, apply_correction(pub, agg.result(), coord.correction_stream())
    )

    ref = Aggregator(pub, job=JOB, server_round=ROUND)
    for p in coord.survivors:
        ref.add(encrypt_update(ctx, models[p], weight=2.0, job=JOB, server_round=ROUND))
    want, want_weight = decrypt_update(ctx, ref.result())
    assert weight == want_weight == 2.0 * (7 - dropouts)
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)


def test_one_dropout_too_many_fails_the_round_cleanly(ctx: HeContext, pub: HeContext) -> None:
    r = _round(7)
    coord, _, _ = _masked_round_through_bfv(ctx, pub, r, r.names[1:4], np.random.default_rng(3))
    with pytest.raises(UnmaskError, match=r"3 of 7 hospitals dropped.*threshold 4.*retry"):
        coord.close()
    assert coord.stage is CoordinatorStage.ABORTED
    with pytest.raises(secagg.StageError):
        coord.request_for("h00")


def test_a_survivor_silent_at_unmasking_fails_cleanly_when_it_is_needed() -> None:
    rng = np.random.default_rng(5)
    r = _round(7)
    for p in r.names:
        r.sessions[p].mask(_ints(rng, 10))
    # No dropout: a silent survivor costs only one share per neighbour; 2 silent are fine.
    coord = _unmask(r, r.names, silent=("h05", "h06"))
    assert coord.pending() == ("h05", "h06")
    assert coord.correction(10).shape == (10,)
    # One dropout: the survivors' masks for it can only come from them.
    r = _round(7)
    for p in r.names:
        r.sessions[p].mask(_ints(rng, 10))
    coord = _unmask(r, r.names[1:], silent=("h06",))
    with pytest.raises(UnmaskError, match=r"'h06' never answered.*dropped 'h00'"):
        coord.correction_stream()
    assert coord.stage is CoordinatorStage.ABORTED
    # Three silent survivors leave some self mask with fewer than T = 4 shares.
    r = _round(7)
    for p in r.names:
        r.sessions[p].mask(_ints(rng, 10))
    coord = _unmask(r, r.names, silent=("h04", "h05", "h06"))
    with pytest.raises(UnmaskError, match=r"only 3 of the 4 shares"):
        coord.correction_stream()


def test_sparse_graph_rounds_cancel_with_a_dropout() -> None:
    params = SecAggParams(degree=4, complete_up_to=3)
    r = _round(14, params)
    graph = neighbour_graph(r.context, params)
    assert all(len(ns) == 4 for ns in graph.values())
    assert all(p in graph[q] for p, ns in graph.items() for q in ns)  # symmetric
    assert graph == neighbour_graph(
        RoundContext(JOB, ROUND, tuple(reversed(r.names)), b"instr"), params
    )
    assert graph != neighbour_graph(RoundContext(JOB, ROUND + 1, r.names, b"instr"), params)
    # Memoised per round (a simulation's worker masks for many hospitals of one round),
    # read-only, and never shared across rounds or parameters.
    assert neighbour_graph(r.context, params) is graph
    with pytest.raises(TypeError):
        graph["h00"] = ()  # type: ignore[index]
    assert neighbour_graph(r.context, SecAggParams(degree=6, complete_up_to=3)) != graph
    rng = np.random.default_rng(9)
    xs = {p: _ints(rng, 64) for p in r.names}
    ys = {p: r.sessions[p].mask(xs[p])[0] for p in r.names}
    arrived = r.names[1:]
    coord = _unmask(r, arrived)
    total = sum(ys[p].astype(object) for p in arrived) - coord.correction(64).astype(object)
    got = centred(np.asarray(total % T_MOD, dtype=np.int64), T_MOD)
    np.testing.assert_array_equal(got, sum(xs[p] for p in arrived))


# --- 4. collusion: the coordinator's view plus one hospital ---------------------------


def _pair_mask(r: Round, a: str, b: str, size: int) -> np.ndarray:
    """The mask ``a`` added for ``b`` (a colluder computes it for its own pairs)."""
    seed = secagg._pair(r.context, a, b, r.keys[a], r.peers[b]).seed
    return MaskSum(T_MOD, [(secagg._sign(a, b), UniformStream(seed, T_MOD))]).take(size)


def _self_mask(r: Round, owner: str, seed: bytes, size: int) -> np.ndarray:
    return UniformStream(secagg._self_key(r.context, owner, seed), T_MOD).take(size)


def _minus(y: np.ndarray, *masks: np.ndarray) -> np.ndarray:
    out = y.astype(object)
    for m in masks:
        out = out - m.astype(object)
    return np.asarray(out % T_MOD, dtype=np.int64)


def _reconstruct_from(shares: list[tuple[int, bytes]], r: Round, owner: str) -> bytes:
    return secagg._reconstruct(
        shares, len(shares), r.sessions[owner].shares.self_commitment, r.context, owner
    )


def test_coordinator_plus_one_hospital_learn_nothing_from_a_survivor() -> None:
    rng = np.random.default_rng(21)
    r = _round(5)  # k = 4, T = 3
    size = 8192
    xs = {p: _ints(rng, size) for p in r.names}
    ys = {p: r.sessions[p].mask(xs[p])[0] for p in r.names}
    coord = _unmask(r, r.names)
    u, w = "h00", "h01"
    # The coordinator rebuilds b_u (that is its job); the colluder w knows m_uw.
    shares = [rep.self_shares[u] for rep in coord._replies.values() if u in rep.self_shares]
    b_u = _reconstruct_from(shares[: coord.threshold], r, u)
    best = _minus(ys[u], _self_mask(r, u, b_u, size), _pair_mask(r, u, w, size))
    # What is left is x_u plus the masks of u's honest neighbours: uniform, unrelated to x_u.
    assert _chi2_p(best) > 1e-3
    assert abs(np.corrcoef(centred(best, T_MOD).astype(float), xs[u].astype(float))[0, 1]) < 0.1
    assert not np.array_equal(centred(best, T_MOD), xs[u])
    # Sanity: the same subtraction with *every* neighbour's mask recovers x_u exactly.
    every = [_pair_mask(r, u, v, size) for v in r.sessions[u].neighbours]
    assert np.array_equal(centred(_minus(ys[u], _self_mask(r, u, b_u, size), *every), T_MOD), xs[u])


def test_a_late_update_stays_hidden_below_the_threshold_and_not_at_it() -> None:
    size = 4096
    rng = np.random.default_rng(8)
    keys = {f"h{i:02d}": x25519.X25519PrivateKey.generate() for i in range(5)}
    for colluders, hidden in (
        (("h01",), True),
        (("h01", "h02"), True),
        (("h01", "h02", "h03"), False),
    ):
        r = _round(5, keys=keys, nonce=bytes([len(colluders)]))  # T = 3
        xs = {p: _ints(rng, size) for p in r.names}
        ys = {p: r.sessions[p].mask(xs[p])[0] for p in r.names}  # every hospital masks
        y_u, x_u = ys["h00"], xs["h00"]
        coord = _unmask(r, r.names[1:])  # h00 reported dropped, its update in hand
        seeds = {v: rep.seeds["h00"] for v, rep in coord._replies.items()}
        assert len(seeds) == 4  # every pairwise seed of h00 is revealed...
        pair = [
            MaskSum(T_MOD, [(secagg._sign("h00", v), UniformStream(s, T_MOD))]).take(size)
            for v, s in seeds.items()
        ]
        stripped = _minus(y_u, *pair)  # ...so only the self mask protects x_u
        shares = [r.sessions[w]._open("h00", r.sessions["h00"].shares.shares[w]) for w in colluders]
        if hidden:  # fewer than T shares: b_u is out of reach
            assert _chi2_p(stripped) > 1e-3
            assert (
                abs(np.corrcoef(centred(stripped, T_MOD).astype(float), x_u.astype(float))[0, 1])
                < 0.1
            )
        else:  # T colluders: the threshold is tight
            b_u = _reconstruct_from(shares, r, "h00")
            got = centred(_minus(stripped, _self_mask(r, "h00", b_u, size)), T_MOD)
            np.testing.assert_array_equal(got, x_u)


def _split_view_attack(threshold: int | None, told_alive_count: int) -> bool:
    """A lying coordinator and one colluder ``w`` against ``u`` among 6 hospitals (k = 5).

    Tell ``u`` that ``told_alive_count`` honest neighbours dropped, to get their seeds
    from ``u``; tell those that ``u`` survived, to get their shares of ``b_u``; tell the
    rest that ``u`` dropped, to get theirs. Whether ``x_u`` falls out. Each honest
    hospital answers one request, as the protocol lets it.
    """
    rng = np.random.default_rng(4)
    r = _round(6, SecAggParams(threshold=threshold, colluders=0 if threshold else 1))
    u, w = "h00", "h05"
    size = 2048
    xs = {p: _ints(rng, size) for p in r.names}
    ys = {p: r.sessions[p].mask(xs[p])[0] for p in r.names}
    sent = {p: r.sessions[p].shares for p in r.names}  # every train reply arrived
    honest = [p for p in r.names if p not in (u, w)]
    told_alive, told_dropped = honest[:told_alive_count], honest[told_alive_count:]

    def ask(v: str, dropped: list[str]) -> UnmaskReply:
        survivors = [p for p in r.names if p not in dropped]
        alive = [p for p in r.sessions[v].neighbours if p in survivors]
        request = UnmaskRequest(
            r.context.digest,
            v,
            tuple(survivors),
            tuple(sorted(dropped)),
            {p: sent[p].shares[v] for p in alive},
        )
        return r.sessions[v].unmask_reply(request)

    try:
        seeds = dict(ask(u, told_alive).seeds)  # u reveals s_uv for the "dropped" ones
    except ProtocolError:
        return False  # u refuses: too few surviving neighbours for its own unmasking
    shares = [ask(v, []).self_shares[u] for v in told_alive]
    shares.append(r.sessions[w]._open(u, sent[u].shares[w]))
    seeds |= {v: ask(v, [u]).seeds[u] for v in told_dropped}
    if len(shares) < r.sessions[u].threshold:
        return False
    b_u = _reconstruct_from(shares, r, u)
    masks = [_self_mask(r, u, b_u, size), _pair_mask(r, u, w, size)]
    masks += [
        MaskSum(T_MOD, [(secagg._sign(u, v), UniformStream(s, T_MOD))]).take(size)
        for v, s in seeds.items()
    ]
    return bool(np.array_equal(centred(_minus(ys[u], *masks), T_MOD), xs[u]))


def test_a_lying_coordinator_plus_one_hospital_fails_at_the_default_threshold() -> None:
    # Default T = 4 for k = 5 (2T > k + 1): whatever split the coordinator tries, u
    # refuses or the shares fall short.
    assert not any(_split_view_attack(None, a) for a in range(5))
    # T = 3 (allowed only with colluders=0: 2T = k + 1) falls to a 2/2 split, so the
    # bound 2T > k + c that docs/secagg.md states is tight.
    assert [_split_view_attack(3, a) for a in range(5)] == [False, False, True, False, False]


# --- 5. the state machines -------------------------------------------------------------


def _hospital_in(stage: Stage) -> tuple[MaskingSession, UnmaskRequest]:
    """h00 of a 4-hospital round in ``stage``, and a valid unmask request for it."""
    r = _round(4)
    for p in r.names:
        if p != "h00" or stage is not Stage.SETUP:
            r.sessions[p].mask(np.zeros(4, dtype=np.int64))
    request = UnmaskRequest(
        r.context.digest,
        "h00",
        r.names,
        (),
        {p: r.sessions[p].shares.shares["h00"] for p in r.names[1:]},
    )
    s = r.sessions["h00"]
    if stage is Stage.UNMASKED:
        s.unmask_reply(request)
    if stage is Stage.ABORTED:
        s.abort()
    return s, request


HOSPITAL_ACTIONS = {
    "mask": lambda s, q: s.mask(np.zeros(4, dtype=np.int64)),
    "shares": lambda s, q: s.shares,
    "unmask": lambda s, q: s.unmask_reply(q),
    "abort": lambda s, q: s.abort(),
}
# (stage, action) -> stage after it; missing pairs must raise StageError.
HOSPITAL_OK = {
    (Stage.SETUP, "mask"): Stage.MASKED,
    (Stage.SETUP, "abort"): Stage.ABORTED,
    (Stage.MASKED, "shares"): Stage.MASKED,
    (Stage.MASKED, "unmask"): Stage.UNMASKED,
    (Stage.MASKED, "abort"): Stage.ABORTED,
    (Stage.UNMASKED, "shares"): Stage.UNMASKED,
    (Stage.UNMASKED, "unmask"): Stage.UNMASKED,  # the identical request: the same reply
    (Stage.UNMASKED, "abort"): Stage.ABORTED,
}


@pytest.mark.parametrize("stage", list(Stage))
@pytest.mark.parametrize("action", list(HOSPITAL_ACTIONS))
def test_hospital_stage_transition(stage: Stage, action: str) -> None:
    session, request = _hospital_in(stage)
    assert session.stage is stage
    if (stage, action) in HOSPITAL_OK:
        HOSPITAL_ACTIONS[action](session, request)
        assert session.stage is HOSPITAL_OK[(stage, action)]
    else:
        with pytest.raises(secagg.StageError):
            HOSPITAL_ACTIONS[action](session, request)
        assert session.stage is stage


COORD_ACTIONS = {
    "check_masked": lambda c, r: c.check_masked(r.sessions["h03"].shares),
    "add_masked": lambda c, r: c.add_masked(r.sessions["h03"].shares),
    "close": lambda c, r: c.close(),
    "request_for": lambda c, r: c.request_for("h00"),
    "add_reply": lambda c, r: c.add_reply(r.sessions["h00"].unmask_reply(c.request_for("h00"))),
    "correction": lambda c, r: c.correction(4),
    "abort": lambda c, r: c.abort(),
}
COORD_OK = {
    (CoordinatorStage.COLLECTING, "add_masked"): CoordinatorStage.COLLECTING,
    (CoordinatorStage.COLLECTING, "check_masked"): CoordinatorStage.COLLECTING,
    (CoordinatorStage.COLLECTING, "close"): CoordinatorStage.UNMASKING,
    (CoordinatorStage.COLLECTING, "abort"): CoordinatorStage.ABORTED,
    (CoordinatorStage.UNMASKING, "request_for"): CoordinatorStage.UNMASKING,
    (CoordinatorStage.UNMASKING, "add_reply"): CoordinatorStage.UNMASKING,
    (CoordinatorStage.UNMASKING, "abort"): CoordinatorStage.ABORTED,
}


def _coordinator_at(stage: CoordinatorStage) -> tuple[UnmaskingSession, Round]:
    """A 4-hospital round with T = 2 (h03 dropped after masking) in ``stage``."""
    r = _round(4, SecAggParams(threshold=2, colluders=0))
    for p in r.names:
        r.sessions[p].mask(np.zeros(4, dtype=np.int64))
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in r.names[:3]:
        coord.add_masked(r.sessions[p].shares)
    if stage is CoordinatorStage.COLLECTING:
        return coord, r
    coord.close()
    if stage is CoordinatorStage.UNMASKING:
        return coord, r
    for v in coord.survivors:
        coord.add_reply(r.sessions[v].unmask_reply(coord.request_for(v)))
    if stage is CoordinatorStage.DONE:
        coord.correction(4)
    else:
        coord.abort()
    return coord, r


@pytest.mark.parametrize("stage", list(CoordinatorStage))
@pytest.mark.parametrize("action", list(COORD_ACTIONS))
def test_coordinator_stage_transition(stage: CoordinatorStage, action: str) -> None:
    coord, r = _coordinator_at(stage)
    assert coord.stage is stage
    if (stage, action) in COORD_OK:
        COORD_ACTIONS[action](coord, r)
        assert coord.stage is COORD_OK[(stage, action)]
    elif stage is CoordinatorStage.UNMASKING and action == "correction":
        # Legal here; with every reply in it succeeds, without them it aborts cleanly.
        with pytest.raises(UnmaskError):
            COORD_ACTIONS[action](coord, r)
        assert coord.stage is CoordinatorStage.ABORTED
    else:
        with pytest.raises(secagg.StageError):
            COORD_ACTIONS[action](coord, r)
        assert coord.stage is stage


def test_a_hospital_never_reveals_both_a_share_and_a_seed_for_one_peer() -> None:
    r = _round(5)
    for p in r.names:
        r.sessions[p].mask(np.zeros(8, dtype=np.int64))
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in r.names:
        coord.add_masked(r.sessions[p].shares)
    coord.close()
    honest = coord.request_for("h00")
    s = r.sessions["h00"]
    both = UnmaskRequest(
        honest.context, "h00", honest.survivors, ("h01",), dict(honest.shares)
    )  # h01 named surviving and dropped
    with pytest.raises(ProtocolError, match="both surviving and dropped"):
        s.unmask_reply(both)
    assert s.stage is Stage.MASKED  # refused: nothing revealed
    reply = s.unmask_reply(honest)
    assert set(reply.self_shares) == {"h01", "h02", "h03", "h04"} and not reply.seeds
    assert s.unmask_reply(honest) == reply  # the same request: the same answer
    # Now claim h01 dropped after all: h00 would reveal s_{h00,h01} next to its share of b_h01.
    survivors = tuple(p for p in r.names if p != "h01")
    later = UnmaskRequest(
        honest.context,
        "h00",
        survivors,
        ("h01",),
        {p: b for p, b in honest.shares.items() if p != "h01"},
    )
    with pytest.raises(secagg.StageError, match="already answered a different"):
        s.unmask_reply(later)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (
            lambda q: UnmaskRequest(b"\0" * 32, q.recipient, q.survivors, q.dropped, q.shares),
            "another round",
        ),
        (
            lambda q: UnmaskRequest(q.context, "h01", q.survivors, q.dropped, q.shares),
            "another round",
        ),
        (
            lambda q: UnmaskRequest(q.context, q.recipient, q.survivors[:-1], (), q.shares),
            "not this round's participants",
        ),
        (
            lambda q: UnmaskRequest(q.context, q.recipient, q.survivors[1:], ("h00",), q.shares),
            "itself as dropped",
        ),
        (
            lambda q: UnmaskRequest(
                q.context,
                q.recipient,
                ("h00", "h01", "h02"),
                ("h03", "h04"),
                {"h01": q.shares["h01"], "h02": q.shares["h02"]},
            ),
            "fewer than the threshold",
        ),
        (
            lambda q: UnmaskRequest(
                q.context,
                q.recipient,
                q.survivors,
                q.dropped,
                {k: v for k, v in q.shares.items() if k != "h01"},
            ),
            "exactly one share",
        ),
        (
            lambda q: UnmaskRequest(
                q.context, q.recipient, q.survivors, q.dropped, {**q.shares, "h01": q.shares["h02"]}
            ),
            "does not open",
        ),
    ],
)
def test_a_hospital_refuses_bad_unmask_requests(tamper, message: str) -> None:
    r = _round(5)
    for p in r.names:
        r.sessions[p].mask(np.zeros(8, dtype=np.int64))
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in r.names:
        coord.add_masked(r.sessions[p].shares)
    coord.close()
    with pytest.raises(ProtocolError, match=message):
        r.sessions["h00"].unmask_reply(tamper(coord.request_for("h00")))
    assert r.sessions["h00"].stage is Stage.MASKED


def test_the_coordinator_refuses_forged_seeds_and_survives_one_corrupt_share() -> None:
    r = _round(7)  # k = 6, T = 4
    rng = np.random.default_rng(2)
    xs = {p: _ints(rng, 32) for p in r.names}
    ys = {p: r.sessions[p].mask(xs[p])[0] for p in r.names}
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in r.names[1:]:
        coord.add_masked(r.sessions[p].shares)
    coord.close()
    replies = {v: r.sessions[v].unmask_reply(coord.request_for(v)) for v in coord.survivors}
    forged = replies["h01"]
    bad = UnmaskReply(forged.sender, forged.context, forged.self_shares, {"h00": b"\1" * 32})
    with pytest.raises(ProtocolError, match="fails its commitment"):
        coord.add_reply(bad)
    # A corrupt share of b_h02 from h03: 5 shares for T = 4, another subset rebuilds it.
    good = replies["h03"]
    index, _ = good.self_shares["h02"]
    corrupt = dict(good.self_shares) | {"h02": (index, bytes(16))}
    coord.add_reply(UnmaskReply(good.sender, good.context, corrupt, good.seeds))
    for v, rep in replies.items():
        if v != "h03":
            coord.add_reply(rep)
    # Seeds are rebuilt while the replies arrive, each from its first T shares; h02's
    # first four hold the corrupt one, so it waits for the end and every share.
    assert set(coord._seeds) == set(coord.survivors) - {"h02"}
    total = sum(ys[p].astype(object) for p in coord.survivors) - coord.correction(32).astype(object)
    got = centred(np.asarray(total % T_MOD, dtype=np.int64), T_MOD)
    np.testing.assert_array_equal(got, sum(xs[p] for p in coord.survivors))


def test_the_coordinator_refuses_shares_from_another_round_or_shape() -> None:
    r = _round(4)
    other = _round(4, nonce=b"other", keys=r.keys)
    r.sessions["h00"].mask(np.zeros(2, dtype=np.int64))
    other.sessions["h00"].mask(np.zeros(2, dtype=np.int64))
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    with pytest.raises(ProtocolError, match="another round"):
        coord.add_masked(other.sessions["h00"].shares)
    s = r.sessions["h00"].shares
    with pytest.raises(ProtocolError, match="its neighbours are"):
        coord.add_masked(MaskedShares(s.sender, s.context, s.self_commitment, {}, s.shares))
    coord.check_masked(s)  # checks only: may be called again
    coord.add_masked(s)
    with pytest.raises(secagg.StageError, match="already sent"):
        coord.check_masked(s)  # its update must not enter the sum twice


# --- 6. the PRG and the key schedule ---------------------------------------------------


def test_prg_is_deterministic_chunking_invariant_and_uniform() -> None:
    key = bytes(range(32))
    whole = UniformStream(key, T_MOD).take(100_000)
    s = UniformStream(key, T_MOD)
    pieces = np.concatenate([s.take(3), s.take(0), s.take(4093), s.take(95_904)])
    np.testing.assert_array_equal(whole, pieces)
    assert whole.max() < T_MOD
    assert not np.array_equal(whole, UniformStream(bytes(31) + b"\1", T_MOD).take(100_000))
    assert _chi2_p(whole) > 1e-3
    # +m and -m of one stream cancel to zero.
    pair = MaskSum(T_MOD, [(1, UniformStream(key, T_MOD)), (-1, UniformStream(key, T_MOD))])
    assert not pair.take(1000).any()
    # A small modulus exercises the rejection: still exactly in range and uniform.
    small = UniformStream(key, 97).take(97 * 200)
    assert small.max() < 97 and chisquare(np.bincount(small, minlength=97)).pvalue > 1e-3


def test_pairwise_seeds_are_symmetric_and_fresh_per_round_and_nonce() -> None:
    r = _round(3)
    a, b = "h00", "h01"

    def seed(context: RoundContext, me: str, peer: str) -> bytes:
        return secagg._pair(context, me, peer, r.keys[me], r.peers[peer]).seed

    s = seed(r.context, a, b)
    assert s == seed(r.context, b, a)  # both ends derive the same seed
    pair = secagg._pair(r.context, a, b, r.keys[a], r.peers[b])
    assert pair.share_key != s  # separate keys for masks and share encryption
    for other in (
        RoundContext(JOB, ROUND + 1, r.names, b"instr"),
        RoundContext(JOB, ROUND, r.names, b"instr2"),
        RoundContext("job-2", ROUND, r.names, b"instr"),
        RoundContext(JOB, ROUND, (*r.names, "h03"), b"instr"),
    ):
        assert seed(other, a, b) != s
    assert seed(r.context, a, "h02") != s


def test_self_masks_are_fresh_every_round() -> None:
    keys = {f"h{i:02d}": x25519.X25519PrivateKey.generate() for i in range(3)}
    x = np.zeros(256, dtype=np.int64)
    first = _round(3, keys=keys).sessions["h00"].mask(x)[0]
    again = _round(3, keys=keys).sessions["h00"].mask(x)[0]  # same context, new session
    assert not np.array_equal(first, again)


# --- parameters, messages ----------------------------------------------------------------


@pytest.mark.parametrize(
    "n, degree, threshold",
    [(3, 2, 2), (4, 3, 3), (5, 4, 3), (6, 5, 4), (7, 6, 4), (10, 9, 6), (11, 10, 6), (64, 18, 10)],
)
def test_default_degree_and_threshold(n: int, degree: int, threshold: int) -> None:
    params = SecAggParams()
    assert params.degree_for(n) == degree
    assert params.threshold_for(degree) == threshold
    assert 2 * threshold > degree + 1  # coordinator + one hospital, even lying


def test_parameters_are_validated() -> None:
    with pytest.raises(InvalidConfigError, match="at least 3"):
        SecAggParams().degree_for(2)
    with pytest.raises(InvalidConfigError, match=r"2T > k \+ colluders"):
        SecAggParams(threshold=3).threshold_for(5)  # 2T = k + 1
    assert SecAggParams(threshold=3, colluders=0).threshold_for(5) == 3
    with pytest.raises(InvalidConfigError, match=r"4 to 5"):
        SecAggParams(threshold=6).threshold_for(5)
    with pytest.raises(InvalidConfigError, match="colluders"):
        SecAggParams(colluders=2).threshold_for(2)  # 3 hospitals cannot withstand 2
    with pytest.raises(InvalidConfigError, match="colluders must be"):
        SecAggParams(colluders=-1)
    # A coordinator that lists extra participants cannot weaken a fixed threshold.
    with pytest.raises(InvalidConfigError, match="threshold 4 for 9 neighbours"):
        SecAggParams(threshold=4).threshold_for(9)
    with pytest.raises(InvalidConfigError, match="even"):
        SecAggParams(degree=5, complete_up_to=3).degree_for(20)
    with pytest.raises(InvalidConfigError, match="twice"):
        RoundContext(JOB, 1, ("a", "b", "a"))
    r = _round(3)
    with pytest.raises(InvalidConfigError, match="not among"):
        MaskingSession(r.context, "zz", r.keys["h00"], r.peers, r.params, T_MOD)
    with pytest.raises(InvalidConfigError, match="does not match"):
        MaskingSession(r.context, "h00", r.keys["h01"], r.peers, r.params, T_MOD)
    with pytest.raises(InvalidConfigError, match="no enrolled"):
        peers = {p: k for p, k in r.peers.items() if p != "h02"}
        MaskingSession(r.context, "h00", r.keys["h00"], peers, r.params, T_MOD)
    with pytest.raises(InvalidConfigError, match=r"outside \(-t/2, t/2\)"):
        r.sessions["h00"].mask(np.array([T_MOD], dtype=np.int64))


def test_messages_roundtrip_and_reject_garbage() -> None:
    r = _round(3)
    for p in r.names:
        r.sessions[p].mask(np.zeros(2, dtype=np.int64))
    coord = _unmask(r, r.names)
    req = coord.request_for("h01")
    reply = r.sessions["h01"].unmask_reply(req)
    shares = r.sessions["h01"].shares
    assert MaskedShares.from_bytes(shares.to_bytes()) == shares
    assert UnmaskRequest.from_bytes(req.to_bytes()) == req
    assert UnmaskReply.from_bytes(reply.to_bytes()) == reply
    for garbage in (
        b"",
        b"{}",
        b"not json",
        reply.to_bytes(),
        b'{"format":"fedvault-secagg","version":2}',
    ):
        with pytest.raises(MalformedUpdateError):
            MaskedShares.from_bytes(garbage)
    broken = shares.to_bytes().replace(b'"self_commitment":"', b'"self_commitment":"AAAA')
    with pytest.raises(MalformedUpdateError, match="self_commitment"):
        MaskedShares.from_bytes(broken)


def test_a_restored_session_replays_and_never_masks_again() -> None:
    r = _round(4)
    for p in r.names:
        r.sessions[p].mask(np.zeros(4, dtype=np.int64))
    coord = UnmaskingSession(r.context, r.params, T_MOD)
    for p in r.names:
        coord.add_masked(r.sessions[p].shares)
    coord.close()
    args = (r.context, "h00", r.keys["h00"], r.peers, r.params, T_MOD)

    fresh = MaskingSession.restore(MaskingSession(*args).export_state(), *args)
    assert fresh.stage is Stage.SETUP

    masked = MaskingSession.restore(r.sessions["h00"].export_state(), *args)
    assert masked.stage is Stage.MASKED and masked.shares == r.sessions["h00"].shares
    with pytest.raises(secagg.StageError):
        masked.mask(np.zeros(4, dtype=np.int64))  # its update is the one already sent
    reply = masked.unmask_reply(coord.request_for("h00"))

    answered = MaskingSession.restore(masked.export_state(), *args)
    assert answered.stage is Stage.UNMASKED
    assert answered.unmask_reply(coord.request_for("h00")) == reply
    other = UnmaskRequest(r.context.digest, "h00", r.names[:3], ("h03",), {})
    with pytest.raises(secagg.StageError, match="already answered"):
        answered.unmask_reply(other)

    with pytest.raises(MalformedUpdateError, match="not 'h01'"):
        MaskingSession.restore(
            masked.export_state(), r.context, "h01", r.keys["h01"], r.peers, r.params, T_MOD
        )
    with pytest.raises(MalformedUpdateError, match="corrupt"):
        MaskingSession.restore(b"{", *args)
    state = masked.export_state().replace(b'"stage": "unmasked"', b'"stage": "masked"')
    state = state.replace(b'"request": "', b'"request_": "')
    with pytest.raises(MalformedUpdateError):
        MaskingSession.restore(state, *args)
