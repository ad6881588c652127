"""The key ceremony's two halves, with kits from a real `provision` run (no Flower)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tenseal as ts
from cryptography.hazmat.primitives.serialization import Encoding

from fedvault.app.provision import provision
from fedvault.client.keys import KeyStore, custodian_ceremony, install_sealed_key
from fedvault.coordinator.key_ceremony import KeyDirectory
from fedvault.errors import KeyMismatchError, SecretKeyExposureError
from fedvault.kit import Kit
from fedvault.privacy.he_context import HeContext

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "consortium.toml"


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    shutil.copy(EXAMPLE, root / "c.toml")
    provision(root / "c.toml", root / "out")
    return root / "out"


def _hospital(kits: Path, name: str) -> Kit:
    return Kit.load(kits / "hospitals" / name)


def test_ceremony_gives_every_hospital_the_same_key_and_the_relay_only_public(
    kits: Path, tmp_path: Path
) -> None:
    custodian = _hospital(kits, "hospital-a")
    stores = {h: KeyStore(tmp_path / h) for h in ("hospital-a", "hospital-b", "hospital-c")}
    public, envelopes = custodian_ceremony(
        custodian, stores["hospital-a"], epoch=1, recipients=["hospital-b", "hospital-c"]
    )
    relay = KeyDirectory(tmp_path / "coordinator" / "keys")
    pub = relay.save_public(1, public)
    assert not pub.is_private and not ts.context_from(public).is_private()
    secret_bytes = stores["hospital-a"].get(1).serialize_secret()
    for name, blob in envelopes.items():
        assert secret_bytes not in blob  # sealed, not merely wrapped
        relay.save_envelope(1, name, blob)
        fp = install_sealed_key(
            _hospital(kits, name),
            stores[name],
            envelope=relay.envelope(1, name) or b"",
            custodian_cert_pem=custodian.certificate().public_bytes(Encoding.PEM),
            epoch=1,
            public_fingerprint=pub.fingerprint,
        )
        assert fp == pub.fingerprint
    fingerprints = {s.get(1).fingerprint for s in stores.values()}
    assert fingerprints == {pub.fingerprint}
    for name, data in relay.blobs():
        assert secret_bytes not in data, name
    # A second request (a hospital enrolled later) reuses the epoch's key.
    again, _ = custodian_ceremony(
        custodian, stores["hospital-a"], epoch=1, recipients=["hospital-b"]
    )
    assert HeContext.from_bytes(again).fingerprint == pub.fingerprint


def test_relay_refuses_to_store_a_secret_context(tmp_path: Path) -> None:
    relay = KeyDirectory(tmp_path / "keys")
    with pytest.raises(SecretKeyExposureError, match="discarded, not stored"):
        relay.save_public(1, HeContext.generate().serialize_secret())
    assert relay.blobs() == []


def test_only_the_custodian_runs_a_ceremony_and_envelopes_are_bound(
    kits: Path, tmp_path: Path
) -> None:
    other = _hospital(kits, "hospital-b")
    with pytest.raises(KeyMismatchError, match="not the key custodian"):
        custodian_ceremony(other, KeyStore(tmp_path / "b"), epoch=1, recipients=["hospital-c"])
    custodian = _hospital(kits, "hospital-a")
    public, envelopes = custodian_ceremony(
        custodian, KeyStore(tmp_path / "a"), epoch=2, recipients=["hospital-b", "hospital-c"]
    )
    pem = custodian.certificate().public_bytes(Encoding.PEM)
    fp = HeContext.from_bytes(public).fingerprint
    # hospital-c's envelope handed to hospital-b: refused, nothing stored.
    store_b = KeyStore(tmp_path / "b2")
    with pytest.raises(KeyMismatchError):
        install_sealed_key(
            other,
            store_b,
            envelope=envelopes["hospital-c"],
            custodian_cert_pem=pem,
            epoch=2,
            public_fingerprint=fp,
        )
    # The right envelope under the wrong epoch: refused before decrypting.
    with pytest.raises(KeyMismatchError, match="epoch"):
        install_sealed_key(
            other,
            store_b,
            envelope=envelopes["hospital-b"],
            custodian_cert_pem=pem,
            epoch=3,
            public_fingerprint=fp,
        )
    # A certificate that is not the custodian's: refused.
    with pytest.raises(KeyMismatchError):
        install_sealed_key(
            other,
            store_b,
            envelope=envelopes["hospital-b"],
            custodian_cert_pem=other.certificate().public_bytes(Encoding.PEM),
            epoch=2,
            public_fingerprint=fp,
        )
    assert store_b.epochs() == []
    with pytest.raises(KeyMismatchError, match="no HE key for key epoch 2"):
        store_b.get(2)
