"""The hospital's HE keys: a key store by epoch, and its half of the key ceremony.

The secret HE context is born at the custodian hospital and leaves it only
sealed (X25519 + HKDF + AES-GCM) to another hospital's enrolled key, signed by
the custodian. The coordinator relays the envelopes and keeps the public
context; it can open neither. Each ceremony has an epoch: a hospital decrypts
only with the key of the epoch an instruction names, so updates under an old
epoch fail before any arithmetic.

Ceremony actions (Flower ``query`` messages, see :func:`handle_key_query`):

``hello``        report the hospital's name and the key epochs it holds;
``key-ceremony`` custodian only: create the epoch's secret context (once) and
                 return its public context plus envelopes for the recipients;
``install-key``  open an envelope, check it against the public fingerprint the
                 coordinator announced, and store it (mode 0600).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from cryptography import x509

from fedvault.durable import atomic_write, fsync_dir
from fedvault.errors import KeyMismatchError, MalformedUpdateError
from fedvault.kit import Kit
from fedvault.privacy.he_context import HeContext
from fedvault.privacy.sealing import SealedKeyEnvelope, seal_context_for

__all__ = ["KeyStore", "custodian_ceremony", "install_sealed_key"]

_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


# A simulation's worker serves thousands of hospitals of one consortium, which all
# hold the same key (one file, hard-linked): parsing it once per hospital cost ~5 ms
# each and a copy in memory. Keyed by the bytes themselves, so a changed file is
# parsed (and checked) afresh.
@functools.lru_cache(maxsize=4)
def _parse(data: bytes) -> HeContext:
    return HeContext.from_bytes(data)


class KeyStore:
    """Secret HE contexts by key epoch, under ``state_dir/keys/epoch-N/``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "keys"
        self._cache: dict[int, HeContext] = {}

    def _path(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch}" / "he-secret.ctx"

    def epochs(self) -> list[int]:
        """The key epochs this hospital holds a secret context for, ascending."""
        if not self.root.is_dir():
            return []
        found = (_EPOCH_DIR.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m and self._path(int(m.group(1))).exists())

    def has(self, epoch: int) -> bool:
        """Whether the secret context of ``epoch`` is stored here."""
        return self._path(epoch).exists()

    def get(self, epoch: int) -> HeContext:
        """The secret context of ``epoch`` (cached); :class:`KeyMismatchError` if not held."""
        if epoch not in self._cache:
            path = self._path(epoch)
            if not path.exists():
                held = self.epochs()
                raise KeyMismatchError(
                    f"no HE key for key epoch {epoch} at this hospital (it holds "
                    f"{held or 'none'}); the key ceremony has not reached it yet — "
                    "restart the hospital daemon so the coordinator can relay the key"
                )
            ctx = _parse(path.read_bytes())
            if not ctx.is_private:
                raise KeyMismatchError(f"{path} holds no secret key; re-run the key ceremony")
            self._cache[epoch] = ctx
        return self._cache[epoch]

    def find(self, fingerprint: str) -> HeContext:
        """The held key whose public fingerprint is ``fingerprint`` (any epoch).

        After a re-key the running job's global model is still encrypted under
        the previous epoch's key; updates must use the current one.
        """
        for epoch in reversed(self.epochs()):
            ctx = self.get(epoch)
            if ctx.fingerprint == fingerprint:
                return ctx
        raise KeyMismatchError(
            f"this hospital holds no HE key with fingerprint {fingerprint[:16]}…; "
            "it was encrypted under a key epoch this hospital never received"
        )

    def put(self, epoch: int, ctx: HeContext) -> Path:
        """Store a secret context, readable by the hospital's account only (0600).

        Durably (:func:`fedvault.durable.atomic_write`): a power cut after this
        returns cannot lose the key, and one during it leaves no torn key.
        """
        path = self._path(epoch)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, ctx.serialize_secret(), 0o600)
        fsync_dir(self.root)  # the epoch folder's own name, perhaps new, survives too
        self._cache[epoch] = ctx
        return path


def custodian_ceremony(
    kit: Kit, keys: KeyStore, *, epoch: int, recipients: list[str]
) -> tuple[bytes, dict[str, bytes]]:
    """Custodian: the epoch's public context and sealed copies for ``recipients``.

    The secret context is generated once per epoch and reused when a hospital
    enrolled later asks for its copy. Recipients' keys come from the custodian's
    own signed kit, never from the relay.
    """
    if not kit.is_custodian:
        raise KeyMismatchError(
            f"{kit.party} is not the key custodian ({kit.custodian} is); refusing to run "
            "a key ceremony"
        )
    if epoch < 1:
        raise MalformedUpdateError(f"key epoch must be >= 1 (got {epoch})")
    secret = keys.get(epoch) if keys.has(epoch) else None
    if secret is None:
        secret = HeContext.generate()
        keys.put(epoch, secret)
    enrolled = kit.seal_public_keys()
    unknown = sorted(set(recipients) - set(enrolled))
    if unknown:
        raise KeyMismatchError(
            f"cannot seal the key to {unknown}: they are not enrolled in the custodian's kit; "
            "re-provision the consortium to add them"
        )
    wanted = {name: enrolled[name] for name in recipients if name != kit.party}
    envelopes = seal_context_for(
        wanted,
        secret.serialize_secret(),
        consortium=kit.consortium,
        epoch=epoch,
        sender=kit.party,
        signing_key=kit.private_key(),
    )
    return secret.public().serialize_public(), {k: v.to_bytes() for k, v in envelopes.items()}


def install_sealed_key(
    kit: Kit,
    keys: KeyStore,
    *,
    envelope: bytes,
    custodian_cert_pem: bytes,
    epoch: int,
    public_fingerprint: str,
) -> str:
    """Recipient: verify, open and store a sealed context; returns its fingerprint."""
    sealed = SealedKeyEnvelope.from_bytes(envelope)
    if sealed.recipient != kit.party or sealed.consortium != kit.consortium:
        raise KeyMismatchError(
            f"sealed key is for {sealed.recipient!r} in {sealed.consortium!r}, not for "
            f"{kit.party!r}; the relay sent the wrong envelope"
        )
    if sealed.sender != kit.custodian:
        raise KeyMismatchError(
            f"sealed key comes from {sealed.sender!r}, but only the custodian "
            f"{kit.custodian!r} may issue keys; alert the consortium operator"
        )
    sealed.verify_sender(x509.load_pem_x509_certificate(custodian_cert_pem), kit.ca_cert)
    ctx = HeContext.from_bytes(sealed.open(kit.seal_private_key(), expected_epoch=epoch))
    if not ctx.is_private or ctx.fingerprint != public_fingerprint:
        raise KeyMismatchError(
            "the opened key does not match the consortium's public context for epoch "
            f"{epoch}; refusing it — ask the custodian to re-run the key ceremony"
        )
    keys.put(epoch, ctx)
    return ctx.fingerprint
