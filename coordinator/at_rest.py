"""Encryption at rest of the round store's plaintext blobs (AES-256-GCM).

Ciphertexts are stored as they arrive: the coordinator cannot read them
anyway. What it *can* read — the global model in ``secure_aggregation =
"none"`` mode and the hospitals' accountant states — is sealed before it
reaches the database, under a 32-byte key that lives only in the coordinator's
kit (``at-rest.key``), so a copied database file or a database backup does not
hand out models or DP histories.

A sealed blob is ``header || nonce || ciphertext || tag`` with

* ``header = b"FVAR" || version (1 byte) || key id (8 bytes)``: the key id
  (an HMAC of the key, it reveals nothing of it) lets :meth:`AtRestCipher.open`
  tell a *wrong key* (:class:`~fedvault.errors.KeyMismatchError`) from
  a *modified blob* (:class:`~fedvault.errors.StoreError`);
* a fresh random 96-bit nonce per blob (NIST SP 800-38D §8.2.2: with random
  nonces one key may seal up to 2**32 blobs; a store writes a few per round);
* associated data ``header || context``, where the caller's ``context`` names
  the row (e.g. ``"models.blob:job=3:round=7"``), so a blob moved to another
  row, job or column fails authentication instead of being read as that row's.

:class:`RowSealer` is the store's policy on top: each row records how it is
stored (``at_rest``), rows written without a key stay readable after a key is
configured, and a store once encrypted under a key refuses to take plaintext
from an opener without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedvault.errors import InvalidConfigError, KeyMismatchError, StoreError

__all__ = [
    "AES_256_GCM",
    "AT_REST_KEY_BYTES",
    "AT_REST_NONE",
    "AT_REST_SCHEMES",
    "AtRestCipher",
    "AtRestScheme",
    "RowSealer",
    "model_context",
    "state_context",
]

AtRestScheme = Literal["none", "aes-256-gcm"]
AT_REST_NONE: Final = "none"
AES_256_GCM: Final = "aes-256-gcm"
AT_REST_SCHEMES: Final = (AT_REST_NONE, AES_256_GCM)
AT_REST_KEY_BYTES: Final = 32

_MAGIC = b"FVAR"
_VERSION = 1
_KEY_ID_BYTES = 8
_NONCE_BYTES = 12
_TAG_BYTES = 16
_HEADER_BYTES = len(_MAGIC) + 1 + _KEY_ID_BYTES
_KEY_ID_LABEL = b"fedvault/at-rest/key-id/v1"
_WHAT_TO_DO = (
    "open the store with the at-rest key of the coordinator kit that wrote it "
    "(fedvault coordinator start --kit DIR)"
)


def _key_id(key: bytes) -> bytes:
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:_KEY_ID_BYTES]


class AtRestCipher:
    """Seal and open the store's plaintext blobs under one AES-256-GCM key.

    Parameters
    ----------
    key
        Exactly 32 random bytes (:meth:`fedvault.kit.Kit.at_rest_key`).
    """

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) != AT_REST_KEY_BYTES:
            size = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
            raise InvalidConfigError(
                f"at_rest_key must be {AT_REST_KEY_BYTES} bytes, got {size}; pass "
                "Kit.at_rest_key() of the coordinator kit"
            )
        self._aead = AESGCM(bytes(key))
        self._key_id = _key_id(bytes(key))
        self._header = _MAGIC + bytes([_VERSION]) + self._key_id

    @property
    def key_id(self) -> str:
        """Hex id of the key (an HMAC of it): safe to store, log and compare."""
        return self._key_id.hex()

    def __repr__(self) -> str:
        return f"AtRestCipher(key_id={self.key_id})"

    def seal(self, data: bytes, context: str) -> bytes:
        """Encrypt ``data`` for the row that ``context`` names."""
        nonce = os.urandom(_NONCE_BYTES)
        aad = self._header + context.encode("utf-8")
        return self._header + nonce + self._aead.encrypt(nonce, bytes(data), aad)

    def open(self, blob: bytes, context: str) -> bytes:
        """Decrypt a blob sealed by :meth:`seal` for the same ``context``.

        Raises
        ------
        KeyMismatchError
            The blob was sealed under another key.
        StoreError
            The blob is not a sealed blob, or was modified or moved to another row.
        """
        blob = bytes(blob)
        if len(blob) < _HEADER_BYTES + _NONCE_BYTES + _TAG_BYTES or not blob.startswith(_MAGIC):
            raise StoreError(
                f"{context} is marked as encrypted at rest but is not a sealed blob "
                f"({len(blob)} bytes): the store was corrupted or edited; restore it from a backup"
            )
        if blob[len(_MAGIC)] != _VERSION:
            raise StoreError(
                f"{context} was sealed with at-rest format version {blob[len(_MAGIC)]}, which "
                "this fedvault does not know; upgrade fedvault"
            )
        key_id = blob[len(_MAGIC) + 1 : _HEADER_BYTES]
        if key_id != self._key_id:
            raise KeyMismatchError(
                f"{context} was encrypted at rest under key {key_id.hex()}, not this key "
                f"({self.key_id}); {_WHAT_TO_DO}"
            )
        nonce = blob[_HEADER_BYTES : _HEADER_BYTES + _NONCE_BYTES]
        aad = self._header + context.encode("utf-8")
        try:
            return self._aead.decrypt(nonce, blob[_HEADER_BYTES + _NONCE_BYTES :], aad)
        except InvalidTag:
            raise StoreError(
                f"{context} failed authentication: the encrypted blob was modified, or moved "
                "from another row; restore the store from a backup"
            ) from None


def model_context(job_id: int, number: int) -> str:
    """Associated data of a model blob: its job and round."""
    return f"models.blob:job={job_id}:round={number}"


def state_context(job_id: int, hospital: str, number: int) -> str:
    """Associated data of an accountant state: its job, hospital and round."""
    return f"privacy_ledger.accountant_state:job={job_id}:hospital={hospital}:round={number}"


class RowSealer:
    """How the round store stores its plaintext blobs, row by row.

    Parameters
    ----------
    cipher
        The opener's key, or ``None``.
    stored_key_id
        The id of the key the store is encrypted under (``None``: never was).
    where
        The store's URL, for messages.
    """

    def __init__(self, cipher: AtRestCipher | None, stored_key_id: str | None, where: str) -> None:
        self._cipher = cipher
        self._stored_key_id = stored_key_id
        self._where = where

    @property
    def encrypts(self) -> bool:
        """Whether new rows are sealed."""
        return self._cipher is not None

    def seal(self, data: bytes, context: str) -> tuple[bytes, AtRestScheme]:
        """``data`` as it is to be stored, and its ``at_rest`` scheme.

        Raises
        ------
        StoreError
            The store is encrypted at rest and this opener has no key.
        """
        if self._cipher is not None:
            return self._cipher.seal(data, context), AES_256_GCM
        if self._stored_key_id is not None:
            raise StoreError(
                f"the round store at {self._where} is encrypted at rest (key "
                f"{self._stored_key_id}) but was opened without its key, so {context} cannot "
                f"be stored; {_WHAT_TO_DO}"
            )
        return data, AT_REST_NONE

    def open(self, data: bytes, at_rest: str, context: str) -> bytes:
        """The stored ``data`` as it was given to :meth:`seal`."""
        if at_rest == AT_REST_NONE:
            return data
        if at_rest != AES_256_GCM:
            raise StoreError(f"{context} is stored as {at_rest!r}, unknown here; upgrade fedvault")
        if self._cipher is None:
            raise StoreError(f"{context} is encrypted at rest; {_WHAT_TO_DO}")
        return self._cipher.open(data, context)

    def seal_text(self, text: str, context: str) -> tuple[str, AtRestScheme]:
        """Text as stored in a text column: itself, or the base64 of the sealed UTF-8."""
        data, at_rest = self.seal(text.encode("utf-8"), context)
        return (
            text if at_rest == AT_REST_NONE else base64.b64encode(data).decode("ascii")
        ), at_rest

    def open_text(self, stored: str, at_rest: str, context: str) -> str | None:
        """Text stored by :meth:`seal_text`; ``None`` when it is sealed and there is no key.

        Read-only tooling (reports, status, demos) opens the store without the
        kit: it sees every number, but not the sealed text.
        """
        if at_rest == AT_REST_NONE:
            return stored
        if self._cipher is None:
            return None
        try:
            data = base64.b64decode(stored, validate=True)
        except binascii.Error:
            raise StoreError(
                f"{context} is not base64: the store was edited; restore it from a backup"
            ) from None
        return self.open(data, at_rest, context).decode("utf-8")
