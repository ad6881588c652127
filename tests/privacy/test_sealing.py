"""Key sealing: X25519 + HKDF-SHA256 + AES-256-GCM, and the relayed envelope."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from fedvault.errors import InvalidConfigError, KeyMismatchError, MalformedUpdateError
from fedvault.privacy.pki import Role, create_ca, generate_x25519_keypair, issue_client_cert
from fedvault.privacy.sealing import (
    SealedKeyEnvelope,
    envelope_context,
    open_sealed,
    seal,
    seal_context_for,
)

CTX = envelope_context(consortium="c", epoch=1, recipient="hospital-b", sender="hospital-a")
HEADER = 4 + 1 + 32 + 12  # magic, version, ephemeral public key, nonce
TAG = 16


@pytest.mark.parametrize("size", [0, 1, 31, 4096, 1 << 20])
def test_round_trip_and_exact_overhead(size: int) -> None:
    key, pub = generate_x25519_keypair()
    secret = os.urandom(size)
    blob = seal(secret, pub, context=CTX)
    assert len(blob) == HEADER + size + TAG
    assert blob[:5] == b"FVSK\x01"
    assert open_sealed(blob, key, context=CTX) == secret


def test_two_seals_of_the_same_plaintext_differ() -> None:
    key, pub = generate_x25519_keypair()
    a, b = seal(b"same secret", pub, context=CTX), seal(b"same secret", pub, context=CTX)
    assert a[5:37] != b[5:37]  # fresh ephemeral key
    assert a[37:49] != b[37:49]  # fresh nonce
    assert a[49:] != b[49:]
    assert open_sealed(a, key, context=CTX) == open_sealed(b, key, context=CTX) == b"same secret"


def test_wrong_recipient_key_refused() -> None:
    _, pub = generate_x25519_keypair()
    other, _ = generate_x25519_keypair()
    with pytest.raises(KeyMismatchError, match="re-run the key ceremony"):
        open_sealed(seal(b"s", pub, context=CTX), other, context=CTX)


@pytest.mark.parametrize("position", [0, 4, 5, 40, HEADER, -1])
def test_any_tampered_byte_refused(position: int) -> None:
    key, pub = generate_x25519_keypair()
    blob = bytearray(seal(b"ckks secret context", pub, context=CTX))
    blob[position] ^= 0x01
    with pytest.raises(KeyMismatchError):
        open_sealed(bytes(blob), key, context=CTX)


def test_truncated_blob_refused() -> None:
    key, pub = generate_x25519_keypair()
    blob = seal(b"x" * 100, pub, context=CTX)
    for cut in (0, 10, HEADER + TAG - 1, len(blob) - 1):
        with pytest.raises(KeyMismatchError):
            open_sealed(blob[:cut], key, context=CTX)


@pytest.mark.parametrize(
    "field",
    [{"epoch": 2}, {"recipient": "hospital-c"}, {"consortium": "d"}, {"sender": "hospital-c"}],
)
def test_wrong_context_refused(field: dict[str, object]) -> None:
    key, pub = generate_x25519_keypair()
    blob = seal(b"s", pub, context=CTX)
    args = {
        "consortium": "c",
        "epoch": 1,
        "recipient": "hospital-b",
        "sender": "hospital-a",
        **field,
    }
    with pytest.raises(KeyMismatchError, match="another consortium/epoch/recipient"):
        open_sealed(blob, key, context=envelope_context(**args))  # type: ignore[arg-type]


def test_low_order_ephemeral_point_refused() -> None:
    key, _ = generate_x25519_keypair()
    blob = b"FVSK\x01" + bytes(32) + bytes(12) + bytes(32)  # all-zero point: shared secret 0
    with pytest.raises(KeyMismatchError):
        open_sealed(blob, key, context=CTX)


def _hospitals(
    n: int,
) -> tuple[dict[str, x25519.X25519PrivateKey], dict[str, x25519.X25519PublicKey]]:
    keys = {f"hospital-{i}": x25519.X25519PrivateKey.generate() for i in range(n)}
    return keys, {name: k.public_key() for name, k in keys.items()}


def test_ceremony_seals_to_every_other_hospital_and_relay_round_trips() -> None:
    keys, pubs = _hospitals(4)
    secret = os.urandom(5000)
    envs = seal_context_for(pubs, secret, consortium="c", epoch=3, sender="hospital-0")
    assert sorted(envs) == ["hospital-1", "hospital-2", "hospital-3"]  # not the custodian
    for name, env in envs.items():
        relayed = SealedKeyEnvelope.from_bytes(env.to_bytes())
        assert relayed == env
        assert (relayed.recipient, relayed.epoch, relayed.sender) == (name, 3, "hospital-0")
        assert relayed.open(keys[name], expected_epoch=3) == secret
        # The relayed JSON holds the labels and ciphertext only.
        assert secret not in relayed.to_bytes()
    with pytest.raises(KeyMismatchError):
        envs["hospital-1"].open(keys["hospital-2"])
    with pytest.raises(KeyMismatchError, match="epoch 3 but the consortium is at epoch 4"):
        envs["hospital-1"].open(keys["hospital-1"], expected_epoch=4)


def test_relabelled_envelope_cannot_be_opened() -> None:
    keys, pubs = _hospitals(2)
    env = seal_context_for(pubs, b"sk", consortium="c", epoch=1, sender="hospital-0")["hospital-1"]
    obj = json.loads(env.to_bytes())
    obj["epoch"] = 2  # a relay replays an old ceremony as the new epoch
    replayed = SealedKeyEnvelope.from_bytes(json.dumps(obj).encode())
    with pytest.raises(KeyMismatchError, match="another consortium/epoch/recipient"):
        replayed.open(keys["hospital-1"], expected_epoch=2)


def test_envelope_signature_authenticates_the_custodian() -> None:
    ca, ca_key = create_ca("c")
    custodian_cert, custodian_key = issue_client_cert(ca, ca_key, "hospital-0", hospital=True)
    other_cert, other_key = issue_client_cert(ca, ca_key, "hospital-1", hospital=True)
    admin_cert, admin_key = issue_client_cert(ca, ca_key, "hospital-0x", role=Role.ADMIN)
    keys, pubs = _hospitals(3)
    envs = seal_context_for(
        pubs, b"sk", consortium="c", epoch=1, sender="hospital-0", signing_key=custodian_key
    )
    env = SealedKeyEnvelope.from_bytes(envs["hospital-2"].to_bytes())
    env.verify_sender(custodian_cert, ca)
    assert env.open(keys["hospital-2"]) == b"sk"

    # A relay that seals a key of its own can't sign it as the custodian.
    forged = seal_context_for(pubs, b"relay key", consortium="c", epoch=1, sender="hospital-0")
    with pytest.raises(KeyMismatchError, match="not signed by 'hospital-0'"):
        forged["hospital-2"].verify_sender(custodian_cert, ca)
    with pytest.raises(KeyMismatchError, match="not signed by"):
        forged["hospital-2"].sign(other_key).verify_sender(custodian_cert, ca)
    with pytest.raises(KeyMismatchError, match="certificate is for 'hospital-1'"):
        env.verify_sender(other_cert, ca)
    admin_env = SealedKeyEnvelope(
        consortium="c", epoch=1, recipient="hospital-2", sender="hospital-0x", blob=b"x"
    ).sign(admin_key)
    with pytest.raises(KeyMismatchError, match="only the custodian hospital"):
        admin_env.verify_sender(admin_cert, ca)  # operators cannot run a ceremony
    stranger_ca, stranger_key = create_ca("c")
    fake_cert, fake_key = issue_client_cert(stranger_ca, stranger_key, "hospital-0", hospital=True)
    with pytest.raises(KeyMismatchError, match="was not issued by CA"):
        env.sign(fake_key).verify_sender(fake_cert, ca)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"format": "other"}',
        b'{"format": "fedvault-sealed-key", "version": 9}',
        b'{"format": "fedvault-sealed-key", "version": 1, "consortium": "c", "epoch": 0,'
        b' "recipient": "r", "sender": "s", "blob": ""}',
        b'{"format": "fedvault-sealed-key", "version": 1, "consortium": "c", "epoch": 1,'
        b' "recipient": "r", "sender": "s", "blob": "!!"}',
    ],
)
def test_malformed_envelope_refused(data: bytes) -> None:
    with pytest.raises(MalformedUpdateError, match="relay it again"):
        SealedKeyEnvelope.from_bytes(data)


def test_envelope_validation() -> None:
    with pytest.raises(InvalidConfigError, match="epoch"):
        SealedKeyEnvelope(consortium="c", epoch=True, recipient="r", sender="s", blob=b"")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfigError, match="recipient"):
        SealedKeyEnvelope(consortium="c", epoch=1, recipient="", sender="s", blob=b"")
    with pytest.raises(InvalidConfigError, match="empty secret"):
        seal_context_for({}, b"", consortium="c", epoch=1, sender="s")
