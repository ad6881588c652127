"""Masked updates inside the encryption: SecAgg+ pairwise and self masks under BFV.

Every hospital holds the consortium's BFV secret key, so encryption alone hides
an update only from the coordinator: the coordinator plus any one hospital can
decrypt any single update. Masking closes that gap. A hospital adds, in BFV's
plaintext space (integers mod the plaintext prime ``t``), a mask that is
uniformly random to anyone short of the other parties' secrets; the masks
cancel in the sum, so the decrypted aggregate is the unmasked one bit for bit.
The construction follows SecAgg+ (Bell et al., CCS 2020), on top of Bonawitz
et al. (CCS 2017):

* **Pairwise masks.** Hospitals ``u < v`` that are neighbours in the round's
  graph derive a seed ``s_uv = HKDF-SHA256(X25519(sk_u, pk_v))`` from their
  enrolled static keys (every kit carries its peers' X25519 keys), with the
  round in the HKDF info: no key-advertisement round trip, and a revealed seed
  exposes that pair in that round only. ``u`` adds ``PRG(s_uv)``, ``v``
  subtracts it: they cancel in the sum.
* **Self mask.** A fresh 16-byte seed ``b_u`` per round, expanded by the PRG.
  It protects ``u`` when the coordinator learns ``u``'s pairwise seeds (``u``
  was reported dropped, its update arrived anyway).
* **Shamir sharing.** ``b_u`` is split among ``u``'s neighbours with threshold
  ``T`` (PyCryptodome's :class:`~Crypto.Protocol.SecretSharing.Shamir`), each
  share encrypted to its holder with ChaCha20-Poly1305 under a second key from
  the same agreement. The shares ride in ``u``'s train reply, so the
  coordinator holds ``u``'s shares exactly when it holds ``u``'s update.
* **Unmasking** (the one extra round trip). The coordinator fixes the
  survivors ``S`` (update received) and the dropped ``D`` (asked, not
  received) and asks each survivor ``v`` for its share of ``b_u`` for each
  surviving neighbour ``u``, and for ``s_vd`` for each dropped neighbour ``d``.
  It rebuilds every ``b_u`` from ``T`` shares and subtracts
  ``sum PRG(b_u) + sum ±PRG(s_vd)`` from the encrypted sum as a plaintext.

Why the extra round trip cannot be folded away: which masks must be removed
depends on who dropped, which is only known after the train replies are in,
and the secrets that remove them are held by the survivors.

Each hospital is an explicit state machine (:class:`MaskingSession`:
``SETUP -> MASKED -> UNMASKED``, or ``ABORTED``), the coordinator another
(:class:`UnmaskingSession`: ``COLLECTING -> UNMASKING -> DONE``, or
``ABORTED``); a message a stage does not accept raises :class:`StageError`. A
hospital answers **one** unmask request per round (the identical request again
gets the identical reply), and refuses a request whose sets do not add up, that
names it dropped, or that leaves it fewer than ``T`` surviving neighbours: it
never reveals both a share of ``b_u`` and the seed ``s_uv`` for one ``u``,
whatever the coordinator claims. ``docs/secagg.md`` states the resulting
guarantee.

A hospital must never mask two different updates under one
:class:`RoundContext`: its pairwise masks would repeat, and two rounds' replies
together could cancel them. Whatever it sent for a context it sends again
unchanged (``client/sent.py`` replays replies keyed by the exact instruction);
the context's ``nonce`` carries that instruction's digest.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.privacy.secagg_messages import (
    SHARE_BYTES,
    MaskedShares,
    ProtocolError,
    SecAggError,
    StageError,
    UnmaskError,
    UnmaskReply,
    UnmaskRequest,
)
from fedvault.privacy.secagg_prg import MaskSum, UniformStream, check_modulus

__all__ = [
    "CoordinatorStage",
    "MaskSum",
    "MaskedShares",
    "MaskingSession",
    "ProtocolError",
    "RoundContext",
    "SecAggError",
    "SecAggParams",
    "Stage",
    "StageError",
    "UnmaskError",
    "UnmaskReply",
    "UnmaskRequest",
    "UnmaskingSession",
    "neighbour_graph",
]

_LABEL = b"fedvault-secagg v1\x00"
_NONCE_BYTES = 12
_MAX_NONCE = 64
_SUBSETS_TRIED = 64  # share subsets tried when a reconstruction fails its commitment
_STATE_FORMAT = "fedvault-secagg-session-v1"


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: unambiguous whatever the parts hold."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _sha(*parts: bytes) -> bytes:
    return hashlib.sha256(_LABEL + _lp(*parts)).digest()


def _raw(public: x25519.X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- parameters, round context, neighbour graph --------------------------------------


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """Neighbour-graph degree, reconstruction threshold, and the collusion they withstand.

    Parameters
    ----------
    threshold
        Shares needed to rebuild a self-mask seed, ``T``. Default (None): the
        smallest ``T`` with ``2T > k + colluders`` for degree ``k``, i.e.
        ``(k + colluders) // 2 + 1``. An explicit ``T`` must satisfy the same bound
        and ``T <= k``; a larger ``T`` withstands more colluders and fewer dropouts
        (a round survives ``k - T`` dropped neighbours per hospital).
    colluders
        Hospitals that may collude with the coordinator, which may also lie about
        who dropped, without learning any single update: the threshold must satisfy
        ``2T > k + colluders`` (``docs/secagg.md``). Checked at every hospital for
        the degree the coordinator's participant list gives it, so listing extra
        participants cannot weaken it. ``0`` protects only against the coordinator
        alone (which holds no BFV secret key anyway).
    degree
        Neighbours per hospital, ``k``. Default (None): the complete graph up to
        ``complete_up_to`` participants (every consortium of about ten hospitals
        or fewer), else ``3 * ceil(log2 n)`` rounded up to even (SecAgg+'s
        ``O(log n)`` degree). A sparse degree must be even (a ring of ``k/2``
        neighbours each side).
    complete_up_to
        Largest round that always uses the complete graph.
    min_participants
        Fewer participants make no round: with two, each learns the other's update
        from the aggregate.
    """

    threshold: int | None = None
    colluders: int = 1
    degree: int | None = None
    complete_up_to: int = 10
    min_participants: int = 3

    def __post_init__(self) -> None:
        for name in ("threshold", "degree"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidConfigError(f"secagg {name} must be an int or None, got {value!r}")
            if value is not None and value < 1:
                raise InvalidConfigError(f"secagg {name} must be >= 1, got {value}")
        c = self.colluders
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise InvalidConfigError(f"secagg colluders must be an int >= 0, got {c!r}")
        if self.min_participants < 3:
            raise InvalidConfigError(
                f"secagg min_participants={self.min_participants}: at least 3, since with two "
                "hospitals each learns the other's update from the aggregate"
            )

    def degree_for(self, participants: int) -> int:
        """The degree ``k`` of a round of ``participants`` hospitals.

        Raises
        ------
        InvalidConfigError
            If the round is smaller than ``min_participants``, or ``degree`` is an
            odd number below ``participants - 1``.
        """
        n = participants
        if n < self.min_participants:
            raise InvalidConfigError(
                f"a masked round needs at least {self.min_participants} hospitals, got {n}"
            )
        if self.degree is None:
            if n <= self.complete_up_to:
                return n - 1
            k = 3 * math.ceil(math.log2(n))
            return min(n - 1, k + k % 2)
        if self.degree >= n - 1:
            return n - 1
        if self.degree % 2:
            raise InvalidConfigError(
                f"secagg degree={self.degree} must be even for a sparse graph of {n} hospitals"
            )
        return self.degree

    def threshold_for(self, degree: int) -> int:
        """The threshold ``T`` for neighbourhoods of ``degree`` hospitals.

        Raises
        ------
        InvalidConfigError
            If ``2T <= degree + colluders`` or ``T > degree``.
        """
        k, c = degree, self.colluders
        t = (k + c) // 2 + 1 if self.threshold is None else self.threshold
        if not (k + c) // 2 + 1 <= t <= k:
            raise InvalidConfigError(
                f"secagg threshold {t} for {k} neighbours and {c} colluders: it must satisfy "
                f"2T > k + colluders and T <= k ({(k + c) // 2 + 1} to {k}); with less, a "
                "coordinator lying about dropouts could rebuild both masks of one hospital. "
                "Raise the threshold, lower colluders, or enrol more hospitals"
            )
        return t


@dataclass(frozen=True)
class RoundContext:
    """What one masked round is bound to; every key and mask is derived under it.

    Parameters
    ----------
    job, server_round
        The job and round.
    participants
        Every hospital sent this round's train instruction (sorted here).
    nonce
        Public bytes that differ whenever a hospital could compute a new update for
        the same job and round (the instruction's digest): masks never repeat.
    """

    job: str
    server_round: int
    participants: tuple[str, ...]
    nonce: bytes = b""
    digest: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(self.participants)
        if any(not isinstance(p, str) or not p for p in names):
            raise InvalidConfigError(f"participants must be non-empty names, got {names!r}")
        if len(set(names)) != len(names):
            raise InvalidConfigError(f"participants name a hospital twice: {sorted(names)}")
        r = self.server_round
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < 2**32:
            raise InvalidConfigError(f"server_round must be an int in [0, 2**32), got {r!r}")
        if not isinstance(self.nonce, bytes) or len(self.nonce) > _MAX_NONCE:
            raise InvalidConfigError(f"the round nonce must be at most {_MAX_NONCE} bytes")
        object.__setattr__(self, "participants", tuple(sorted(names)))
        digest = _sha(
            b"round",
            self.job.encode(),
            r.to_bytes(4, "big"),
            self.nonce,
            *(p.encode() for p in self.participants),
        )
        object.__setattr__(self, "digest", digest)


def neighbour_graph(context: RoundContext, params: SecAggParams) -> Mapping[str, tuple[str, ...]]:
    """Every participant's neighbours (sorted), the same at every party.

    The complete graph when the degree is ``n - 1``; otherwise SecAgg+'s random
    Harary graph: the participants on a ring in an order drawn from the round's
    public digest, each joined to the ``k/2`` nearest on either side.

    Memoised per process (read-only): the graph is public and a pure function of
    the round, and a simulation's worker masks for thousands of hospitals of the
    same round, each of which would otherwise rebuild all ``n`` rows.
    """
    return _graph(context, params)


@functools.lru_cache(maxsize=4)  # a round or two per job
def _graph(context: RoundContext, params: SecAggParams) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType(_build_graph(context, params))


def _build_graph(context: RoundContext, params: SecAggParams) -> dict[str, tuple[str, ...]]:
    names = context.participants
    n = len(names)
    k = params.degree_for(n)
    if k == n - 1:
        return {p: tuple(q for q in names if q != p) for p in names}
    seed = _sha(b"graph", context.digest)
    ring = sorted(names, key=lambda p: hashlib.sha256(seed + p.encode()).digest())
    graph: dict[str, tuple[str, ...]] = {}
    for i, p in enumerate(ring):
        near = {ring[(i + j) % n] for j in range(1, k // 2 + 1)}
        near |= {ring[(i - j) % n] for j in range(1, k // 2 + 1)}
        graph[p] = tuple(sorted(near))
    return graph


def _sign(me: str, peer: str) -> int:
    """+1 when ``me`` adds the pair's mask, -1 when it subtracts it."""
    return 1 if me < peer else -1


# --- key derivation, commitments, share encryption ------------------------------------


def _self_key(context: RoundContext, me: str, seed: bytes) -> bytes:
    """The PRG key of ``me``'s self mask, from its 16-byte seed."""
    info = _LABEL + b"self-mask" + _lp(context.digest, me.encode())
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(seed)


def _self_commitment(context: RoundContext, me: str, seed: bytes) -> bytes:
    return _sha(b"commit-self", context.digest, me.encode(), seed)


def _pair_commitment(context: RoundContext, a: str, b: str, seed: bytes) -> bytes:
    lo, hi = sorted((a, b))
    return _sha(b"commit-pair", context.digest, lo.encode(), hi.encode(), seed)


@dataclass(frozen=True)
class _Pair:
    """One neighbour's secrets for this round: the mask seed and the share key."""

    seed: bytes
    share_key: bytes


def _pair(
    context: RoundContext,
    me: str,
    peer: str,
    private: x25519.X25519PrivateKey,
    peer_public: x25519.X25519PublicKey,
) -> _Pair:
    """One neighbour's round secrets: HKDF-SHA256 of the static X25519 agreement.

    Salted with both public keys, bound to the round and the (sorted) pair; one
    key per purpose.
    """
    try:
        shared = private.exchange(peer_public)
    except ValueError as exc:  # a low-order public key: no shared secret
        raise ProtocolError(f"the enrolled X25519 key of {peer!r} is invalid: {exc}") from exc
    (lo, pk_lo), (hi, pk_hi) = sorted([(me, _raw(private.public_key())), (peer, _raw(peer_public))])
    salt = hashlib.sha256(_LABEL + pk_lo + pk_hi).digest()

    def derive(purpose: bytes) -> bytes:
        info = _LABEL + purpose + _lp(context.digest, lo.encode(), hi.encode())
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(shared)

    return _Pair(seed=derive(b"pairwise-mask"), share_key=derive(b"share-key"))


def _share_aad(context: RoundContext, sender: str, recipient: str) -> bytes:
    return _LABEL + b"share" + _lp(context.digest, sender.encode(), recipient.encode())


def _seal_share(key: bytes, aad: bytes, index: int, share: bytes) -> bytes:
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, index.to_bytes(2, "big") + share, aad)


def _open_share(key: bytes, aad: bytes, blob: bytes) -> tuple[int, bytes]:
    """Raises ``InvalidTag`` on a blob that was not sealed under ``key`` and ``aad``."""
    plain = ChaCha20Poly1305(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    if len(plain) != 2 + SHARE_BYTES:
        raise InvalidTag
    return int.from_bytes(plain[:2], "big"), plain[2:]


# --- hospital side ---------------------------------------------------------------------


class Stage(StrEnum):
    """A hospital's stage in one masked round."""

    SETUP = "setup"  # keys loaded, nothing sent
    MASKED = "masked"  # masked update and shares sent (train reply)
    UNMASKED = "unmasked"  # unmask reply sent
    ABORTED = "aborted"  # the round was abandoned; the session answers nothing more


class MaskingSession:
    """One hospital's side of one masked round.

    Parameters
    ----------
    context
        The round.
    me
        This hospital's name (a participant).
    private_key
        Its enrolled X25519 key (the kit's ``seal.key``).
    peers
        Every hospital's enrolled X25519 public key, as signed into the kit.
    params
        Degree and threshold (the consortium's, not the coordinator's say).
    plain_modulus
        BFV's plaintext prime ``t`` (``HeContext.params.plain_modulus``).

    Raises
    ------
    InvalidConfigError
        If ``me`` is not a participant, the round is too small, or a neighbour has
        no enrolled key.
    """

    def __init__(
        self,
        context: RoundContext,
        me: str,
        private_key: x25519.X25519PrivateKey,
        peers: Mapping[str, x25519.X25519PublicKey],
        params: SecAggParams,
        plain_modulus: int,
    ) -> None:
        if me not in context.participants:
            raise InvalidConfigError(f"{me!r} is not among this round's participants")
        mine = peers.get(me)
        if mine is not None and _raw(mine) != _raw(private_key.public_key()):
            raise InvalidConfigError(
                f"this hospital's seal.key does not match the key enrolled for {me!r}; "
                "restore the kit"
            )
        graph = neighbour_graph(context, params)
        self.neighbours = graph[me]
        self.threshold = params.threshold_for(len(self.neighbours))
        missing = [p for p in self.neighbours if p not in peers]
        if missing:
            raise InvalidConfigError(
                f"no enrolled X25519 key for neighbours {missing}; install the current kit"
            )
        self.context, self.me = context, me
        self.modulus = check_modulus(plain_modulus)
        self._private = private_key
        self._peers = {p: peers[p] for p in self.neighbours}
        self.stage = Stage.SETUP
        self._shares: MaskedShares | None = None
        self._answered: tuple[UnmaskRequest, UnmaskReply] | None = None

    def _require(self, *stages: Stage, action: str) -> None:
        if self.stage not in stages:
            allowed = " or ".join(s.value for s in stages)
            raise StageError(
                f"{self.me!r} cannot {action} in stage {self.stage.value!r} "
                f"(only in {allowed}) for round {self.context.server_round} of "
                f"{self.context.job!r}"
            )

    def mask_stream(self) -> MaskSum:
        """Draw this round's self-mask seed, share it, and return the mask to add.

        Moves ``SETUP -> MASKED``. The returned :class:`MaskSum` adds the mask to
        the fixed-point integers as they are encoded (``apply``, in order, once);
        :attr:`shares` is what goes into the train reply. The seed itself is not
        kept: once shared, only ``T`` neighbours together can bring it back.
        """
        self._require(Stage.SETUP, action="mask an update")
        seed = os.urandom(16)
        pairs = {
            p: _pair(self.context, self.me, p, self._private, pk) for p, pk in self._peers.items()
        }
        split = Shamir.split(self.threshold, len(self.neighbours), seed, False)
        sealed = {
            p: _seal_share(pairs[p].share_key, _share_aad(self.context, self.me, p), index, share)
            for p, (index, share) in zip(self.neighbours, split, strict=True)
        }
        self._shares = MaskedShares(
            sender=self.me,
            context=self.context.digest,
            self_commitment=_self_commitment(self.context, self.me, seed),
            seed_commitments={
                p: _pair_commitment(self.context, self.me, p, pair.seed)
                for p, pair in pairs.items()
            },
            shares=sealed,
        )
        terms = [(1, UniformStream(_self_key(self.context, self.me, seed), self.modulus))]
        terms += [
            (_sign(self.me, p), UniformStream(pair.seed, self.modulus)) for p, pair in pairs.items()
        ]
        self.stage = Stage.MASKED
        return MaskSum(self.modulus, terms)

    def mask(self, ints: NDArray[np.integer]) -> tuple[NDArray[np.int64], MaskedShares]:
        """Mask a whole fixed-point vector at once: ``(y in [0, t), shares)``.

        Moves ``SETUP -> MASKED``; see :meth:`mask_stream` to mask piece by piece.
        """
        masked = self.mask_stream().apply(ints)
        return masked, self.shares

    @property
    def shares(self) -> MaskedShares:
        """The :class:`MaskedShares` for the train reply (once masked)."""
        self._require(Stage.MASKED, Stage.UNMASKED, action="give its shares")
        assert self._shares is not None
        return self._shares

    def unmask_reply(self, request: UnmaskRequest) -> UnmaskReply:
        """Answer the coordinator's unmask request; ``MASKED -> UNMASKED``.

        The same request again gets the same reply; any other request after a reply
        raises :class:`StageError`: one answer per round, so a hospital never reveals
        both a share of ``b_u`` and the seed it shares with ``u``.

        Raises
        ------
        StageError
            Out of order, or a second, different request.
        ProtocolError
            The request is for another round or hospital, its survivors and dropped
            do not partition the participants, it names this hospital dropped, it
            leaves fewer than ``T`` surviving neighbours, or a relayed share does not
            open. The stage does not change: nothing was revealed.
        """
        if self.stage is Stage.UNMASKED and self._answered is not None:
            if request == self._answered[0]:
                return self._answered[1]
            raise StageError(
                f"{self.me!r} already answered a different unmask request for this round; "
                "it answers once, so it never reveals both a self-mask share and a pairwise "
                "seed of one peer"
            )
        self._require(Stage.MASKED, action="answer an unmask request")
        survivors, dropped = self._check_request(request)
        self_shares = {}
        for peer in self.neighbours:
            if peer in survivors:
                self_shares[peer] = self._open(peer, request.shares[peer])
        seeds = {
            peer: _pair(self.context, self.me, peer, self._private, self._peers[peer]).seed
            for peer in self.neighbours
            if peer in dropped
        }
        reply = UnmaskReply(
            sender=self.me, context=self.context.digest, self_shares=self_shares, seeds=seeds
        )
        self._answered = (request, reply)
        self.stage = Stage.UNMASKED
        return reply

    def _check_request(self, request: UnmaskRequest) -> tuple[set[str], set[str]]:
        if request.context != self.context.digest or request.recipient != self.me:
            raise ProtocolError(
                f"the unmask request is for {request.recipient!r} in another round, not for "
                f"{self.me!r} in round {self.context.server_round} of {self.context.job!r}"
            )
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ProtocolError(
                f"the unmask request names {sorted(survivors & dropped)} both surviving and "
                "dropped; refusing, as answering would reveal both kinds of secret for them"
            )
        if survivors | dropped != set(self.context.participants):
            raise ProtocolError(
                "the unmask request's survivors and dropped are not this round's participants"
            )
        if self.me not in survivors:
            raise ProtocolError(f"the unmask request names {self.me!r} itself as dropped")
        alive = [p for p in self.neighbours if p in survivors]
        if len(alive) < self.threshold:
            raise ProtocolError(
                f"the unmask request leaves {self.me!r} {len(alive)} surviving neighbours, "
                f"fewer than the threshold {self.threshold}: its own update could not be "
                "unmasked, so it reveals nothing"
            )
        if set(request.shares) != set(alive):
            raise ProtocolError(
                "the unmask request does not relay exactly one share from each surviving "
                f"neighbour (expected {alive}, got {sorted(request.shares)})"
            )
        return survivors, dropped

    def _open(self, peer: str, blob: bytes) -> tuple[int, bytes]:
        key = _pair(self.context, self.me, peer, self._private, self._peers[peer]).share_key
        try:
            return _open_share(key, _share_aad(self.context, peer, self.me), blob)
        except InvalidTag as exc:
            raise ProtocolError(
                f"the share relayed from {peer!r} does not open: it was not sealed by "
                f"{peer!r} to {self.me!r} for this round"
            ) from exc

    def export_state(self) -> bytes:
        """The session's state, to keep on disk across a restart (:meth:`restore`).

        Holds no self-mask seed (it is gone once shared) but the unmask reply, which
        reveals neighbours' shares and seeds: store it as a secret (mode 0600). A
        hospital persists it *before* sending a train or unmask reply, so that after
        a crash it replays what it sent instead of masking or answering anew.
        """
        answered = self._answered
        doc = {
            "format": _STATE_FORMAT,
            "context": self.context.digest.hex(),
            "me": self.me,
            "stage": self.stage.value,
            "shares": None if self._shares is None else self._shares.to_bytes().decode(),
            "request": None if answered is None else answered[0].to_bytes().decode(),
            "reply": None if answered is None else answered[1].to_bytes().decode(),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def restore(
        cls,
        state: bytes,
        context: RoundContext,
        me: str,
        private_key: x25519.X25519PrivateKey,
        peers: Mapping[str, x25519.X25519PublicKey],
        params: SecAggParams,
        plain_modulus: int,
    ) -> MaskingSession:
        """Rebuild a session from :meth:`export_state` (the other arguments as at first).

        A restored ``MASKED`` session can answer the unmask request but never mask
        again: its update is the one already sent.

        Raises
        ------
        MalformedUpdateError
            If ``state`` is not a state of this session's round and hospital.
        """
        session = cls(context, me, private_key, peers, params, plain_modulus)
        try:
            doc = json.loads(state)
            ok = doc["format"] == _STATE_FORMAT and doc["me"] == me
            ok = ok and bytes.fromhex(doc["context"]) == context.digest
            stage = Stage(doc["stage"])
            raw = doc["shares"]
            shares = None if raw is None else MaskedShares.from_bytes(raw.encode())
            if doc["request"] is not None:
                request = UnmaskRequest.from_bytes(doc["request"].encode())
                session._answered = (request, UnmaskReply.from_bytes(doc["reply"].encode()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedUpdateError(
                f"the saved secure-aggregation state is corrupt: {exc}"
            ) from exc
        expected = {  # stage -> (shares kept, unmask reply kept); ABORTED may hold either
            Stage.SETUP: (False, False),
            Stage.MASKED: (True, False),
            Stage.UNMASKED: (True, True),
        }
        held = (shares is not None, session._answered is not None)
        if shares is not None and (shares.sender != me or shares.context != context.digest):
            ok = False
        if not ok or expected.get(stage, held) != held:
            raise MalformedUpdateError(
                f"the saved secure-aggregation state is not {me!r}'s for this round, or is "
                "inconsistent; it cannot be restored"
            )
        session._shares = shares
        session.stage = stage
        return session

    def abort(self) -> None:
        """Abandon the round: the session answers nothing more (``-> ABORTED``)."""
        self._require(Stage.SETUP, Stage.MASKED, Stage.UNMASKED, action="abort")
        self.stage = Stage.ABORTED


# --- coordinator side -----------------------------------------------------------------


class CoordinatorStage(StrEnum):
    """The coordinator's stage in one masked round."""

    COLLECTING = "collecting"  # train replies arriving
    UNMASKING = "unmasking"  # survivors fixed, unmask requests out
    DONE = "done"  # correction computed
    ABORTED = "aborted"  # the round cannot be unmasked


class UnmaskingSession:
    """The coordinator's side of one masked round: collect shares, ask, correct.

    Holds no secret key and learns nothing it needs none for: the self masks of the
    survivors and the pairwise masks between survivors and the dropped, which is
    exactly what must be taken out of the sum.

    Parameters
    ----------
    context, params, plain_modulus
        As the hospitals' (:class:`MaskingSession`).
    """

    def __init__(self, context: RoundContext, params: SecAggParams, plain_modulus: int) -> None:
        self.context = context
        self.modulus = check_modulus(plain_modulus)
        self.graph = neighbour_graph(context, params)
        self.threshold = params.threshold_for(len(next(iter(self.graph.values()))))
        self.stage = CoordinatorStage.COLLECTING
        self._masked: dict[str, MaskedShares] = {}
        self._replies: dict[str, UnmaskReply] = {}
        # Each survivor's self-mask shares as they came back, and the seeds rebuilt as
        # soon as T of them were in (see add_reply).
        self._shares_of: dict[str, list[tuple[int, bytes]]] = {}
        self._seeds: dict[str, bytes] = {}
        self.survivors: tuple[str, ...] = ()
        self.dropped: tuple[str, ...] = ()

    def _require(self, stage: CoordinatorStage, action: str) -> None:
        if self.stage is not stage:
            raise StageError(
                f"the coordinator cannot {action} in stage {self.stage.value!r} (only in "
                f"{stage.value!r}) for round {self.context.server_round} of {self.context.job!r}"
            )

    def check_masked(self, shares: MaskedShares) -> None:
        """Check a hospital's shares without recording them.

        Call it before adding the hospital's ciphertext to the sum, and
        :meth:`add_masked` after: a masked update in the sum whose shares are not
        recorded could never be unmasked.

        Raises
        ------
        StageError
            After :meth:`close`, or the hospital's shares are already recorded (its
            update must not be added twice either).
        ProtocolError
            Another round, not a participant, or not one entry per neighbour.
        """
        self._require(CoordinatorStage.COLLECTING, "add a masked update")
        sender = shares.sender
        if shares.context != self.context.digest or sender not in self.graph:
            raise ProtocolError(
                f"masked update from {sender!r} is for another round or from a hospital "
                "outside this round; leave it out"
            )
        if sender in self._masked:
            raise StageError(f"{sender!r} already sent its masked update this round")
        want = set(self.graph[sender])
        if set(shares.shares) != want or set(shares.seed_commitments) != want:
            raise ProtocolError(
                f"{sender!r} sent shares or commitments for {sorted(shares.shares)}, its "
                f"neighbours are {sorted(want)}; leave its update out"
            )

    def add_masked(self, shares: MaskedShares) -> None:
        """Record a hospital's shares, received with its masked update.

        Raises what :meth:`check_masked` raises.
        """
        self.check_masked(shares)
        self._masked[shares.sender] = shares

    def close(self) -> None:
        """Fix the survivors (shares received) and the dropped; ``-> UNMASKING``.

        Raises
        ------
        UnmaskError
            Some survivor has fewer than ``T`` surviving neighbours: its self mask
            cannot be rebuilt (``-> ABORTED``).
        """
        self._require(CoordinatorStage.COLLECTING, "close the collection")
        self.survivors = tuple(sorted(self._masked))
        self.dropped = tuple(p for p in self.context.participants if p not in self._masked)
        short = {
            u: n
            for u in self.survivors
            if (n := sum(v in self._masked for v in self.graph[u])) < self.threshold
        }
        if not self.survivors or short:
            self.stage = CoordinatorStage.ABORTED
            raise UnmaskError(
                f"round {self.context.server_round} of {self.context.job!r} cannot be "
                f"unmasked: {len(self.dropped)} of {len(self.context.participants)} hospitals "
                f"dropped, leaving {short or 'no survivors'} (surviving neighbours) below the "
                f"threshold {self.threshold}; record the failure and retry (nothing was revealed)"
            )
        self.stage = CoordinatorStage.UNMASKING

    def request_for(self, hospital: str) -> UnmaskRequest:
        """The unmask request for one survivor (the same every time it is asked)."""
        self._require(CoordinatorStage.UNMASKING, "ask for unmasking")
        if hospital not in self.survivors:
            raise ProtocolError(f"{hospital!r} is not a survivor of this round; nothing to ask")
        return UnmaskRequest(
            context=self.context.digest,
            recipient=hospital,
            survivors=self.survivors,
            dropped=self.dropped,
            shares={
                u: self._masked[u].shares[hospital]
                for u in self.graph[hospital]
                if u in self._masked
            },
        )

    def add_reply(self, reply: UnmaskReply) -> None:
        """Record a survivor's unmask reply.

        Every revealed seed is checked against the commitment that survivor sent
        with its update first.

        Raises
        ------
        StageError
            Out of order, or a second, different reply from one hospital.
        ProtocolError
            Another round, not a survivor, the wrong peers, a share index that is not
            the sender's, or a seed that does not match its commitment.
        """
        self._require(CoordinatorStage.UNMASKING, "add an unmask reply")
        v = reply.sender
        if reply.context != self.context.digest or v not in self.survivors:
            raise ProtocolError(f"unmask reply from {v!r} is for another round or not a survivor")
        if v in self._replies:
            if self._replies[v] == reply:
                return
            raise StageError(f"{v!r} already sent a different unmask reply this round")
        alive = {u for u in self.graph[v] if u in self._masked}
        gone = set(self.graph[v]) - alive
        if set(reply.self_shares) != alive or set(reply.seeds) != gone:
            raise ProtocolError(
                f"{v!r} answered for {sorted(reply.self_shares)} / {sorted(reply.seeds)}, "
                f"asked for {sorted(alive)} / {sorted(gone)}"
            )
        for u, (index, _) in reply.self_shares.items():
            if index != self.graph[u].index(v) + 1:
                raise ProtocolError(f"{v!r} returned share {index} of {u!r}, not its own")
        for d, seed in reply.seeds.items():
            if _pair_commitment(self.context, v, d, seed) != self._masked[v].seed_commitments[d]:
                raise ProtocolError(f"the seed {v!r} revealed for {d!r} fails its commitment")
        self._replies[v] = reply
        for u, share in reply.self_shares.items():
            shares = self._shares_of.setdefault(u, [])
            shares.append(share)
            if len(shares) == self.threshold:
                self._rebuild_early(u)

    def _rebuild_early(self, u: str) -> None:
        """Rebuild ``u``'s self-mask seed from its first ``T`` shares, while replies arrive.

        Rebuilding every seed at the end was the coordinator's longest step of a large
        round (``n`` Lagrange interpolations, ~13 ms each at ``T = 21``), done while
        every hospital waited; here it overlaps the replies still on their way. The
        coordinator learns nothing it would not learn at the end. If these shares do
        not match the commitment (a corrupt share), :meth:`correction_stream` tries
        again with every share that came back.
        """
        try:
            seed = _reconstruct(
                self._shares_of[u], self.threshold, self._masked[u].self_commitment, self.context, u
            )
        except UnmaskError:
            return
        self._seeds[u] = seed

    def pending(self) -> tuple[str, ...]:
        """Survivors that have not replied yet."""
        return tuple(v for v in self.survivors if v not in self._replies)

    def correction_stream(self) -> MaskSum:
        """What to subtract from the encrypted sum: ``-> DONE``.

        Raises
        ------
        UnmaskError
            A survivor's self mask has fewer than ``T`` shares (or none that match its
            commitment), or a survivor next to a dropped hospital never replied
            (``-> ABORTED``).
        """
        self._require(CoordinatorStage.UNMASKING, "compute the correction")
        try:
            terms = [(1, self._self_stream(u)) for u in self.survivors]
            terms += self._dropped_streams()
        except UnmaskError:
            self.stage = CoordinatorStage.ABORTED
            raise
        self.stage = CoordinatorStage.DONE
        return MaskSum(self.modulus, terms)

    def correction(self, length: int) -> NDArray[np.int64]:
        """The whole correction vector (``length`` values in ``[0, t)``); ``-> DONE``."""
        return self.correction_stream().take(length).astype(np.int64)

    def _self_stream(self, u: str) -> UniformStream:
        seed = self._seeds.get(u)
        if seed is None:
            shares = self._shares_of.get(u, [])
            if len(shares) < self.threshold:
                raise UnmaskError(
                    f"only {len(shares)} of the {self.threshold} shares needed to unmask {u!r} "
                    f"came back (waiting on {list(self.pending())}); the attempt fails: record "
                    "it (a retry needs a fresh round context)"
                )
            seed = _reconstruct(
                shares, self.threshold, self._masked[u].self_commitment, self.context, u
            )
        return UniformStream(_self_key(self.context, u, seed), self.modulus)

    def _dropped_streams(self) -> list[tuple[int, UniformStream]]:
        terms = []
        for d in self.dropped:
            for v in self.graph[d]:
                if v not in self._masked:
                    continue  # both dropped: neither mask is in the sum
                if v not in self._replies:
                    raise UnmaskError(
                        f"{v!r} never answered, so the mask it added for dropped {d!r} cannot "
                        "be removed; the attempt fails: record it (a retry needs a fresh round "
                        "context)"
                    )
                terms.append((_sign(v, d), UniformStream(self._replies[v].seeds[d], self.modulus)))
        return terms

    def abort(self) -> None:
        """Abandon the round (``-> ABORTED``)."""
        if self.stage in (CoordinatorStage.DONE, CoordinatorStage.ABORTED):
            raise StageError(f"the round is already {self.stage.value}")
        self.stage = CoordinatorStage.ABORTED


def _reconstruct(
    shares: list[tuple[int, bytes]],
    threshold: int,
    commitment: bytes,
    context: RoundContext,
    owner: str,
) -> bytes:
    """Rebuild a self-mask seed from ``threshold`` of ``shares``.

    The result is checked against the owner's commitment; if a share is corrupt,
    a few other subsets are tried.
    """
    for subset in itertools.islice(itertools.combinations(shares, threshold), _SUBSETS_TRIED):
        try:
            seed = Shamir.combine(list(subset), False)
        except ValueError:
            continue
        if _self_commitment(context, owner, seed) == commitment:
            return seed
    raise UnmaskError(
        f"the shares returned for {owner!r} do not rebuild the seed it committed to; a "
        "neighbour returned a corrupt share; the attempt fails"
    )
