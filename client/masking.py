"""The hospital's side of masked rounds (SecAgg+ inside BFV, ``docs/secagg.md``).

* :func:`masked_update` masks and encrypts a trained update under the round
  context of the instruction and keeps, *before* the reply leaves, the session
  state (mode 0600) and the unmasked update (so that a retry of the round re-masks
  the same update under its new context: no retraining, no extra privacy spend).
* :func:`answer_unmask` answers the coordinator's unmask query from the stored
  session, and answers **one** context per (job, round) (a durable record): no two
  attempts of a round can both be unmasked.
* :func:`purge_committed` deletes a committed round's kept update and sessions
  (only the small ``answered`` record stays), so the unmasked update does not
  outlive the round on disk.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
from cryptography.hazmat.primitives.asymmetric import x25519

from fedvault.client.keys import KeyStore
from fedvault.durable import atomic_write
from fedvault.errors import FedvaultError, KeyMismatchError
from fedvault.messages import ReplyStatus, RoundInstruction, UnmaskAnswer, UnmaskQuery
from fedvault.npz import arrays_from_bytes, arrays_to_bytes
from fedvault.privacy.pki import (
    generate_x25519_keypair,
    load_x25519_private_pem,
    load_x25519_public_pem,
    private_key_to_pem,
    public_key_to_pem,
)
from fedvault.privacy.secagg import MaskingSession, RoundContext, SecAggParams
from fedvault.privacy.secagg_he import encrypt_masked_update
from fedvault.privacy.secagg_messages import MaskedShares, SecAggError

__all__ = [
    "SealKeys",
    "answer_unmask",
    "masked_update",
    "provision_seal_keys",
    "purge_committed",
    "remask",
]

log = logging.getLogger("fedvault.client")

#: The consortium's masking parameters (the defaults: T withstands one colluding
#: hospital and a coordinator that lies about dropouts). Never from the instruction.
PARAMS = SecAggParams()

SealKeys = tuple[x25519.X25519PrivateKey, Mapping[str, x25519.X25519PublicKey]]

#: Where simulated hospitals keep their X25519 keys (deployed ones use the kit's).
SEAL_KEY = "seal.key"
SEAL_PUB = "seal.pub"


def provision_seal_keys(hospitals_dir: Path, names: list[str]) -> None:
    """Give each simulated hospital under ``hospitals_dir`` an X25519 key (once)."""
    for name in names:
        state = hospitals_dir / name
        if (state / SEAL_KEY).exists() and (state / SEAL_PUB).exists():
            continue
        state.mkdir(parents=True, exist_ok=True)
        private, public = generate_x25519_keypair()
        atomic_write(state / SEAL_KEY, private_key_to_pem(private))
        atomic_write(state / SEAL_PUB, public_key_to_pem(public), mode=0o644)


def simulated_seal_keys(state_dir: Path) -> SealKeys:
    """A simulated hospital's key and its peers' public keys (siblings of ``state_dir``)."""
    private = load_x25519_private_pem((state_dir / SEAL_KEY).read_bytes())
    hospitals = state_dir.parent
    return private, _simulated_peers(hospitals, hospitals.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _simulated_peers(hospitals_dir: Path, mtime_ns: int) -> Mapping[str, x25519.X25519PublicKey]:
    """Every simulated hospital's public key, read once per process and folder version.

    Each masked update and unmask answer needs the peers' keys: read afresh, a
    simulation read all of them for every hospital and round (20 ms a call at
    1,000 hospitals, quadratic in all). A hospital added changes the folder's
    mtime (``mtime_ns``), so its key is read.
    """
    return MappingProxyType(
        {
            p.parent.name: load_x25519_public_pem(p.read_bytes())
            for p in sorted(hospitals_dir.glob(f"*/{SEAL_PUB}"))
        }
    )


class _Store:
    """``state_dir/secagg/<job>/round-<n>/``: the update, sessions and the answered context."""

    def __init__(self, state_dir: Path, job: str, server_round: int) -> None:
        self.root = Path(state_dir) / "secagg" / job / f"round-{server_round}"

    def session(self, context: RoundContext) -> Path:
        return self.root / f"{context.digest.hex()}.json"

    @property
    def update(self) -> Path:
        return self.root / "update.npz"

    @property
    def answered(self) -> Path:
        return self.root / "answered"

    def save(self, context: RoundContext, session: MaskingSession) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {
            "participants": list(context.participants),
            "nonce": context.nonce.hex(),
            "modulus": session.modulus,
            "state": session.export_state().decode(),
        }
        atomic_write(self.session(context), json.dumps(doc))


def masked_update(
    keys: KeyStore,
    seal: SealKeys,
    me: str,
    instr: RoundInstruction,
    weights: Mapping[str, np.ndarray],
    samples: int,
    *,
    state_dir: Path,
) -> tuple[bytes, str]:
    """Mask, encrypt and keep one update: ``(envelope, MaskedShares as JSON)``."""
    store = _Store(state_dir, instr.job.job, instr.server_round)
    store.root.mkdir(parents=True, exist_ok=True)
    if not store.update.exists():
        atomic_write(store.update, arrays_to_bytes(weights))
    ctx = keys.get(instr.key_epoch)
    context = instr.round_context()
    session = MaskingSession(context, me, seal[0], seal[1], PARAMS, ctx.params.plain_modulus)
    envelope = encrypt_masked_update(
        ctx,
        weights,
        mask=session.mask_stream(),
        weight=float(samples),
        key_epoch=instr.key_epoch,
        job=instr.job.job,
        server_round=instr.server_round,
    )
    store.save(context, session)  # before the reply can leave
    return envelope, session.shares.to_bytes().decode()


def remask(
    keys: KeyStore,
    seal: SealKeys,
    me: str,
    instr: RoundInstruction,
    shares: str,
    samples: int,
    *,
    state_dir: Path,
) -> tuple[bytes, str] | None:
    """The stored update masked under ``instr``'s context, if a reply for another was kept.

    ``None`` when the kept reply (``shares``) is already for this context.
    """
    context = instr.round_context()
    if shares and MaskedShares.from_bytes(shares.encode()).context == context.digest:
        return None
    store = _Store(state_dir, instr.job.job, instr.server_round)
    if not store.update.exists():
        raise KeyMismatchError(
            f"round {instr.server_round} was answered unmasked or its update is gone; "
            "it cannot be masked for this attempt"
        )
    weights = arrays_from_bytes(store.update.read_bytes())
    log.info("%s: re-masking round %d for attempt %d", me, instr.server_round, instr.attempt)
    return masked_update(keys, seal, me, instr, weights, samples, state_dir=state_dir)


def answer_unmask(seal: SealKeys, me: str, query: UnmaskQuery, *, state_dir: Path) -> UnmaskAnswer:
    """Answer an unmask query from the stored session, or refuse it (nothing revealed)."""
    store = _Store(state_dir, query.job, query.server_round)
    digest = query.request.context.hex()
    try:
        path = store.root / f"{digest}.json"
        if not path.exists():
            raise KeyMismatchError("no masked update of this hospital belongs to that round")
        answered = store.answered.read_text() if store.answered.exists() else digest
        if answered != digest:
            raise KeyMismatchError(
                "another attempt of this round was already unmasked; a second is refused"
            )
        doc = json.loads(path.read_text())
        context = RoundContext(
            query.job, query.server_round, tuple(doc["participants"]), bytes.fromhex(doc["nonce"])
        )
        session = MaskingSession.restore(
            doc["state"].encode(), context, me, seal[0], seal[1], PARAMS, int(doc["modulus"])
        )
        reply = session.unmask_reply(query.request)
        # Durable before the reply leaves: one context per (job, round), and the same
        # reply again for the same request after a restart.
        atomic_write(store.answered, digest)
        store.save(context, session)
    except (FedvaultError, SecAggError, KeyError, ValueError) as exc:
        log.warning("%s refused an unmask request: %s", me, exc)
        return UnmaskAnswer(hospital=me, status=ReplyStatus.REFUSED, reason=str(exc))
    return UnmaskAnswer(hospital=me, status=ReplyStatus.OK, reply=reply)


def purge_committed(state_dir: Path, job: str, *, through_round: int | None = None) -> list[int]:
    """Delete the kept update and sessions of ``job``'s committed rounds.

    ``through_round``: the last round known committed (a train instruction for
    round ``r`` carries the aggregate of ``r - 1``; the final evaluation that of
    the last round); ``None``: the whole job ended. The ``answered`` record stays,
    so a late unmask query for a purged round is still refused with its reason.
    Returns the rounds purged.
    """
    purged = []
    for root in sorted((Path(state_dir) / "secagg" / job).glob("round-*")):
        try:
            server_round = int(root.name.removeprefix("round-"))
        except ValueError:
            continue
        if through_round is not None and server_round > through_round:
            continue
        kept = [p for p in root.iterdir() if p.name != "answered"]
        for path in kept:
            path.unlink(missing_ok=True)
        if kept:
            purged.append(server_round)
    if purged:
        log.debug("purged the masking state of %s rounds %s", job, purged)
    return purged
