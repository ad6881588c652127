"""Sealing a HE secret context to one hospital's enrolled X25519 key.

The custodian hospital generates the secret HE context and seals one copy to
each other hospital; the coordinator relays and stores the envelopes but cannot
open them. The construction is the ECIES / HPKE base-mode pattern built from
:mod:`cryptography` primitives only (RFC 7748 X25519, RFC 5869 HKDF-SHA256,
AES-256-GCM per NIST SP 800-38D):

1. a fresh ephemeral X25519 key pair per seal, ECDH with the recipient's key;
2. HKDF-SHA256, salt = ephemeral public ‖ recipient public (binds both keys),
   info = a fixed label ‖ ``context`` (consortium, epoch, recipient, sender), so
   a key derived for one epoch or recipient is useless for another;
3. AES-256-GCM with a random 96-bit nonce; the header and ``context`` are the
   associated data, so relabelling an envelope makes it fail to open.

Blob layout (version 1)::

    b"FVSK" | 0x01 | ephemeral X25519 public (32) | nonce (12) | ciphertext ‖ tag (16)

Sealing gives confidentiality, not origin: anyone holding a recipient's public
key can seal *something* to it. A custodian therefore also signs each envelope
with its hospital key (:meth:`SealedKeyEnvelope.sign`), and a recipient checks
it against the consortium CA (:meth:`SealedKeyEnvelope.verify_sender`) before
trusting the context — otherwise a curious relay could hand out a key of its own.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedvault.errors import InvalidConfigError, KeyMismatchError, MalformedUpdateError
from fedvault.privacy.pki import common_name, is_hospital_certificate, verify_issued_by

__all__ = [
    "SealedKeyEnvelope",
    "envelope_context",
    "open_sealed",
    "seal",
    "seal_context_for",
]

_MAGIC = b"FVSK"
_VERSION = 1
_KDF_LABEL = b"fedvault sealed key v1\x00"
_PUB_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_HEADER_LEN = len(_MAGIC) + 1 + _PUB_LEN + _NONCE_LEN
_ENVELOPE_FORMAT = "fedvault-sealed-key"
_OPEN_HINT = (
    "check that this hospital's seal.key belongs to the seal.pub enrolled at provisioning, "
    "and ask the custodian to re-run the key ceremony for the current epoch"
)


def _raw(public: x25519.X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes, context: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral + recipient,
        info=_KDF_LABEL + context,
    ).derive(shared)


def seal(plaintext: bytes, recipient_public: x25519.X25519PublicKey, *, context: bytes) -> bytes:
    """Encrypt ``plaintext`` so only the holder of the matching X25519 private key can read it.

    Two seals of the same plaintext differ: the ephemeral key and the nonce are
    fresh from the operating system's CSPRNG every time.
    """
    ephemeral = x25519.X25519PrivateKey.generate()
    eph_raw = _raw(ephemeral.public_key())
    key = _derive(ephemeral.exchange(recipient_public), eph_raw, _raw(recipient_public), context)
    nonce = os.urandom(_NONCE_LEN)
    header = _MAGIC + bytes([_VERSION]) + eph_raw + nonce
    return header + AESGCM(key).encrypt(nonce, plaintext, header + context)


def open_sealed(
    blob: bytes, recipient_private: x25519.X25519PrivateKey, *, context: bytes
) -> bytes:
    """Decrypt a blob made by :func:`seal` with the same ``context``.

    Raises
    ------
    KeyMismatchError
        Wrong recipient key, wrong context (e.g. another epoch), a modified or
        truncated blob, or an unknown format version.
    """
    if len(blob) < _HEADER_LEN + _TAG_LEN or blob[:4] != _MAGIC:
        raise KeyMismatchError(
            f"sealed key blob is truncated or not a fedvault sealed key ({len(blob)} bytes); "
            "ask the coordinator to relay the envelope again"
        )
    if blob[4] != _VERSION:
        raise KeyMismatchError(
            f"sealed key format version {blob[4]} is not supported (this fedvault reads "
            f"version {_VERSION}); upgrade fedvault on this hospital"
        )
    eph_raw = blob[5 : 5 + _PUB_LEN]
    nonce = blob[5 + _PUB_LEN : _HEADER_LEN]
    recipient_raw = _raw(recipient_private.public_key())
    try:
        shared = recipient_private.exchange(x25519.X25519PublicKey.from_public_bytes(eph_raw))
        key = _derive(shared, eph_raw, recipient_raw, context)
        return AESGCM(key).decrypt(nonce, blob[_HEADER_LEN:], blob[:_HEADER_LEN] + context)
    except (InvalidTag, ValueError):
        # One message for every cause: telling them apart would help an attacker, not the user.
        raise KeyMismatchError(
            "cannot open the sealed key: it was sealed to another key or for another "
            f"consortium/epoch/recipient, or it was modified in transit; {_OPEN_HINT}"
        ) from None


def envelope_context(*, consortium: str, epoch: int, recipient: str, sender: str) -> bytes:
    """The canonical context bytes a ceremony binds into each seal (KDF info and AAD)."""
    return json.dumps(
        {"consortium": consortium, "epoch": epoch, "recipient": recipient, "sender": sender},
        sort_keys=True,
        separators=(",", ":"),
    ).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, kw_only=True)
class SealedKeyEnvelope:
    """One hospital's copy of the secret HE context, as the coordinator relays it.

    The coordinator may store and forward this; without the recipient's
    ``seal.key`` it learns nothing but the labels and the size.
    """

    consortium: str
    epoch: int
    recipient: str
    sender: str
    blob: bytes
    signature: bytes = b""  # sender's ECDSA P-384/SHA-384 signature, see sign()

    def __post_init__(self) -> None:
        if isinstance(self.epoch, bool) or not isinstance(self.epoch, int) or self.epoch < 1:
            raise InvalidConfigError(f"key epoch must be an integer ≥ 1, got {self.epoch!r}")
        for field in ("consortium", "recipient", "sender"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise InvalidConfigError(f"sealed key envelope needs a non-empty {field}")

    @property
    def context(self) -> bytes:
        """Context bytes bound into the seal: relabelling the envelope breaks it."""
        return envelope_context(
            consortium=self.consortium,
            epoch=self.epoch,
            recipient=self.recipient,
            sender=self.sender,
        )

    def signed_payload(self) -> bytes:
        """The exact bytes the sender signs: every field but the signature."""
        return self.context + b"\x00" + self.blob

    def sign(self, signing_key: ec.EllipticCurvePrivateKey) -> SealedKeyEnvelope:
        """A copy signed with the sender hospital's key (its ``hospital.key``)."""
        sig = signing_key.sign(self.signed_payload(), ec.ECDSA(hashes.SHA384()))
        return replace(self, signature=sig)

    def verify_sender(self, sender_cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
        """Check the envelope was signed by the hospital named ``sender``, certified by the CA.

        Raises
        ------
        KeyMismatchError
            Unsigned, signed by someone else, or the certificate is not a
            consortium hospital's certificate for ``sender``.
        """
        try:
            verify_issued_by(sender_cert, ca_cert)
        except InvalidConfigError as exc:
            raise KeyMismatchError(f"sealed key from {self.sender!r} refused: {exc}") from None
        if common_name(sender_cert) != self.sender or not is_hospital_certificate(sender_cert):
            raise KeyMismatchError(
                f"sealed key claims sender {self.sender!r} but the certificate is for "
                f"{common_name(sender_cert)!r}; only the custodian hospital may run the key "
                "ceremony — refuse this envelope and alert the consortium operator"
            )
        public = sender_cert.public_key()
        try:
            if not isinstance(public, ec.EllipticCurvePublicKey) or not self.signature:
                raise InvalidSignature
            public.verify(self.signature, self.signed_payload(), ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise KeyMismatchError(
                f"sealed key for {self.recipient!r} (epoch {self.epoch}) is not signed by "
                f"{self.sender!r}; it may have been forged or altered by the relay — ask the "
                "custodian to re-run the key ceremony"
            ) from None

    def open(
        self, recipient_private: x25519.X25519PrivateKey, *, expected_epoch: int | None = None
    ) -> bytes:
        """Open the envelope, refusing one from another epoch before decrypting."""
        if expected_epoch is not None and self.epoch != expected_epoch:
            raise KeyMismatchError(
                f"sealed key is for key epoch {self.epoch} but the consortium is at epoch "
                f"{expected_epoch}; fetch the envelope of the current ceremony"
            )
        return open_sealed(self.blob, recipient_private, context=self.context)

    def to_bytes(self) -> bytes:
        """JSON with base64 fields: what the coordinator stores and relays."""
        return json.dumps(
            {
                "format": _ENVELOPE_FORMAT,
                "version": _VERSION,
                "consortium": self.consortium,
                "epoch": self.epoch,
                "recipient": self.recipient,
                "sender": self.sender,
                "blob": _b64(self.blob),
                "signature": _b64(self.signature),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedKeyEnvelope:
        """Parse :meth:`to_bytes` output.

        Raises
        ------
        MalformedUpdateError
            Not JSON, another format or version, or missing/ill-typed fields.
        """
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != _ENVELOPE_FORMAT:
                raise ValueError("not a fedvault sealed-key envelope")
            if obj.get("version") != _VERSION:
                raise ValueError(f"unsupported envelope version {obj.get('version')!r}")
            names = [obj["consortium"], obj["recipient"], obj["sender"]]
            if not all(isinstance(n, str) for n in names):
                raise ValueError("names must be strings")
            return cls(
                consortium=obj["consortium"],
                epoch=obj["epoch"],
                recipient=obj["recipient"],
                sender=obj["sender"],
                blob=base64.b64decode(obj["blob"], validate=True),
                signature=base64.b64decode(obj.get("signature", ""), validate=True),
            )
        except (ValueError, KeyError, TypeError, binascii.Error, InvalidConfigError) as exc:
            raise MalformedUpdateError(
                f"sealed key envelope cannot be parsed ({exc}); "
                "ask the coordinator to relay it again"
            ) from None


def seal_context_for(
    hospitals: Mapping[str, x25519.X25519PublicKey],
    secret_context_bytes: bytes,
    *,
    consortium: str,
    epoch: int,
    sender: str,
    signing_key: ec.EllipticCurvePrivateKey | None = None,
) -> dict[str, SealedKeyEnvelope]:
    """Seal the secret HE context to every hospital in ``hospitals`` but the sender.

    Take ``hospitals`` from the custodian's own verified kit (its signed
    ``peers/*.seal.pub``), never from the relay: a relay that substituted a key
    would receive the secret context. Pass ``signing_key`` (the custodian's
    ``hospital.key``) so recipients can check the origin.
    """
    if not secret_context_bytes:
        raise InvalidConfigError("refusing to seal an empty secret context")
    out: dict[str, SealedKeyEnvelope] = {}
    for name, public in hospitals.items():
        if name == sender:
            continue  # the custodian keeps its own copy on its disk
        env = SealedKeyEnvelope(
            consortium=consortium, epoch=epoch, recipient=name, sender=sender, blob=b""
        )
        env = replace(env, blob=seal(secret_context_bytes, public, context=env.context))
        out[name] = env.sign(signing_key) if signing_key is not None else env
    return out
