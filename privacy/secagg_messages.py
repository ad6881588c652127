"""The secure-aggregation messages and errors, transport-agnostic.

Three messages travel per round (:mod:`fedvault.privacy.secagg` explains the
protocol): a hospital's :class:`MaskedShares` rides along with its encrypted
update in the train reply; the coordinator's :class:`UnmaskRequest` and the
hospital's :class:`UnmaskReply` are the one extra round trip. Each is a plain
dataclass with ``to_bytes``/``from_bytes`` (versioned JSON, binary fields in
base64), so any transport can carry it, e.g. as a ``bytes`` value of a Flower
``ConfigRecord``. Parsing checks every field's type and size; the protocol
checks (right round, right sets, right keys) happen in the sessions.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedvault.errors import FedvaultError, MalformedUpdateError

__all__ = [
    "DIGEST_BYTES",
    "SHARE_BYTES",
    "MaskedShares",
    "ProtocolError",
    "SecAggError",
    "StageError",
    "UnmaskError",
    "UnmaskReply",
    "UnmaskRequest",
]

_FORMAT = "fedvault-secagg"
_VERSION = 1
#: Bytes of a round digest, a commitment and a pairwise seed (SHA-256 / HKDF-SHA256 outputs).
DIGEST_BYTES = 32
#: Bytes of one Shamir share of a self-mask seed (PyCryptodome's GF(2^128) shares).
SHARE_BYTES = 16
# An encrypted share: 12-byte nonce + 2-byte index + 16-byte share + 16-byte tag.
_SEALED_SHARE_BYTES = 12 + 2 + SHARE_BYTES + 16
_MAX_MESSAGE_BYTES = 16 << 20


class SecAggError(FedvaultError):
    """Base of the secure-aggregation errors: the round cannot go on as asked."""


class StageError(SecAggError):
    """A message arrived in a stage that does not accept it.

    Out of order, or a second, different request where the protocol allows one.
    """


class ProtocolError(SecAggError):
    """A message is well formed but breaks the protocol.

    Another round, sets that do not add up, a share that does not open, a seed that
    does not match its commitment.
    """


class UnmaskError(SecAggError):
    """The round's aggregate cannot be unmasked.

    Too many dropouts, missing replies or corrupt shares. The round fails; the
    caller records it and retries with a fresh round context.
    """


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(value: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise MalformedUpdateError(f"secure-aggregation message: {what} must be base64 text")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedUpdateError(f"secure-aggregation message: {what} is not base64") from exc
    if length is not None and len(raw) != length:
        raise MalformedUpdateError(
            f"secure-aggregation message: {what} is {len(raw)} bytes, expected {length}"
        )
    return raw


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise MalformedUpdateError(f"secure-aggregation message: {what} must be a non-empty name")
    return value


def _names(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise MalformedUpdateError(f"secure-aggregation message: {what} must be a list of names")
    names = tuple(_name(v, what) for v in value)
    if len(set(names)) != len(names):
        raise MalformedUpdateError(f"secure-aggregation message: {what} repeats a name")
    return names


def _bytes_map(value: object, what: str, length: int | None) -> dict[str, bytes]:
    if not isinstance(value, dict):
        raise MalformedUpdateError(f"secure-aggregation message: {what} must be an object")
    return {_name(k, what): _bytes(v, f"{what}[{k!r}]", length) for k, v in value.items()}


def _dump(kind: str, body: Mapping[str, Any]) -> bytes:
    doc = {"format": _FORMAT, "version": _VERSION, "kind": kind, **body}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _load(data: bytes, kind: str) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedUpdateError(f"a {kind} message must be bytes, got {type(data).__name__}")
    if len(data) > _MAX_MESSAGE_BYTES:
        raise MalformedUpdateError(f"a {kind} message of {len(data)} bytes is too large")
    try:
        doc = json.loads(bytes(data))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedUpdateError(f"cannot parse the {kind} message: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise MalformedUpdateError(f"the {kind} message is not a fedvault secure-aggregation one")
    if doc.get("version") != _VERSION:
        raise MalformedUpdateError(
            f"{kind} message version {doc.get('version')!r}, this fedvault reads {_VERSION}; "
            "run the same fedvault version at every site"
        )
    if doc.get("kind") != kind:
        raise MalformedUpdateError(f"expected a {kind} message, got {doc.get('kind')!r}")
    return doc


@dataclass(frozen=True)
class MaskedShares:
    """What a hospital adds to its train reply.

    Everything the coordinator needs to unmask it later, and nothing that unmasks
    it on its own.

    Attributes
    ----------
    sender
        The hospital.
    context
        :attr:`RoundContext.digest` of the round it masked for.
    self_commitment
        SHA-256 commitment to its self-mask seed, to check a reconstruction.
    seed_commitments
        Per neighbour, the commitment to their pairwise seed, to check a revealed seed.
    shares
        Per neighbour, its Shamir share of the self-mask seed, encrypted to that
        neighbour (ChaCha20-Poly1305): the coordinator relays them unread.
    """

    sender: str
    context: bytes
    self_commitment: bytes
    seed_commitments: Mapping[str, bytes]
    shares: Mapping[str, bytes]

    def to_bytes(self) -> bytes:
        """The wire form."""
        return _dump(
            "masked",
            {
                "sender": self.sender,
                "context": _b64(self.context),
                "self_commitment": _b64(self.self_commitment),
                "seed_commitments": {k: _b64(v) for k, v in self.seed_commitments.items()},
                "shares": {k: _b64(v) for k, v in self.shares.items()},
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> MaskedShares:
        """Parse the wire form.

        Raises
        ------
        MalformedUpdateError
            If it is not a well-formed message of this kind and version.
        """
        doc = _load(data, "masked")
        return cls(
            sender=_name(doc.get("sender"), "sender"),
            context=_bytes(doc.get("context"), "context", DIGEST_BYTES),
            self_commitment=_bytes(doc.get("self_commitment"), "self_commitment", DIGEST_BYTES),
            seed_commitments=_bytes_map(
                doc.get("seed_commitments"), "seed_commitments", DIGEST_BYTES
            ),
            shares=_bytes_map(doc.get("shares"), "shares", _SEALED_SHARE_BYTES),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """The coordinator's request to one surviving hospital.

    Attributes
    ----------
    context
        The round's digest.
    recipient
        The hospital asked.
    survivors, dropped
        The round's participants whose masked update is in the sum, and those whose
        update is not: disjoint, and together every participant.
    shares
        The encrypted shares the surviving neighbours addressed to ``recipient``.
    """

    context: bytes
    recipient: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    shares: Mapping[str, bytes]

    def to_bytes(self) -> bytes:
        """The wire form."""
        return _dump(
            "unmask-request",
            {
                "context": _b64(self.context),
                "recipient": self.recipient,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
                "shares": {k: _b64(v) for k, v in self.shares.items()},
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskRequest:
        """Parse the wire form.

        Raises
        ------
        MalformedUpdateError
            If it is not a well-formed message of this kind and version.
        """
        doc = _load(data, "unmask-request")
        return cls(
            context=_bytes(doc.get("context"), "context", DIGEST_BYTES),
            recipient=_name(doc.get("recipient"), "recipient"),
            survivors=_names(doc.get("survivors"), "survivors"),
            dropped=_names(doc.get("dropped"), "dropped"),
            shares=_bytes_map(doc.get("shares"), "shares", _SEALED_SHARE_BYTES),
        )


@dataclass(frozen=True)
class UnmaskReply:
    """A surviving hospital's answer to an :class:`UnmaskRequest`.

    For each surviving neighbour, its share of that neighbour's self-mask seed; for
    each dropped neighbour, their pairwise seed. Never both for one neighbour.

    Attributes
    ----------
    sender
        The hospital answering.
    context
        The round's digest.
    self_shares
        Surviving neighbour -> (Shamir index, 16-byte share).
    seeds
        Dropped neighbour -> 32-byte pairwise seed of this round.
    """

    sender: str
    context: bytes
    self_shares: Mapping[str, tuple[int, bytes]]
    seeds: Mapping[str, bytes]

    def to_bytes(self) -> bytes:
        """The wire form."""
        return _dump(
            "unmask-reply",
            {
                "sender": self.sender,
                "context": _b64(self.context),
                "self_shares": {k: [i, _b64(s)] for k, (i, s) in self.self_shares.items()},
                "seeds": {k: _b64(v) for k, v in self.seeds.items()},
            },
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UnmaskReply:
        """Parse the wire form.

        Raises
        ------
        MalformedUpdateError
            If it is not a well-formed message of this kind and version.
        """
        doc = _load(data, "unmask-reply")
        raw = doc.get("self_shares")
        if not isinstance(raw, dict):
            raise MalformedUpdateError("secure-aggregation message: self_shares must be an object")
        shares: dict[str, tuple[int, bytes]] = {}
        for peer, value in raw.items():
            ok = isinstance(value, list) and len(value) == 2 and type(value[0]) is int
            if not ok or not 1 <= value[0] < 2**16:
                raise MalformedUpdateError(
                    f"secure-aggregation message: self_shares[{peer!r}] must be [index, share]"
                )
            shares[_name(peer, "self_shares")] = (
                value[0],
                _bytes(value[1], f"self_shares[{peer!r}]", SHARE_BYTES),
            )
        return cls(
            sender=_name(doc.get("sender"), "sender"),
            context=_bytes(doc.get("context"), "context", DIGEST_BYTES),
            self_shares=shares,
            seeds=_bytes_map(doc.get("seeds"), "seeds", DIGEST_BYTES),
        )
