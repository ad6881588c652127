"""Encryption at rest: the AES-256-GCM format, and the round store that uses it."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text

from fedvault.coordinator.at_rest import AtRestCipher, model_context, state_context
from fedvault.coordinator.records import ModelBlob, RoundCommit
from fedvault.coordinator.store import RoundStore, sqlite_url
from fedvault.errors import InvalidConfigError, KeyMismatchError, StoreError

if TYPE_CHECKING:  # fixtures' types; conftest is not importable under --import-mode=importlib
    from conftest import Rounds, StoreTarget

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONFIG = {"rounds": 3, "secure_aggregation": "none"}
HEADER = 4 + 1 + 8  # magic, version, key id
OVERHEAD = HEADER + 12 + 16  # + nonce + tag


def _weights(number: int) -> np.ndarray:
    """A plaintext model whose float64 bytes are easy to look for."""
    return np.linspace(-1.0, 1.0, 2048) * (1.0 + 0.125 * number) + np.pi


def _plain_commit(data: Rounds, number: int) -> RoundCommit:
    commit = data.commit(number)
    model = ModelBlob(number, "plain", _weights(number).tobytes(), commit.model.total_weight)
    return RoundCommit(
        number=number,
        model=model,
        participations=commit.participations,
        train_loss=commit.train_loss,
    )


def _chunks(blob: bytes, size: int = 16) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob) - size + 1, size)]


# -- the format ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 1 << 20])
def test_seal_open_round_trip_and_format(size: int) -> None:
    cipher = AtRestCipher(KEY)
    data = np.random.default_rng(size).bytes(size)
    context = f"models.blob:job=1:round={size}"
    sealed = cipher.seal(data, context)
    assert len(sealed) == size + OVERHEAD
    assert sealed[:5] == b"FVAR\x01" and sealed[5:HEADER].hex() == cipher.key_id
    assert cipher.open(sealed, context) == data
    # Decrypted independently with the documented layout: header || nonce || ct || tag,
    # associated data = header || context.
    plain = AESGCM(KEY).decrypt(
        sealed[HEADER : HEADER + 12], sealed[HEADER + 12 :], sealed[:HEADER] + context.encode()
    )
    assert plain == data
    # A fresh nonce per blob: sealing twice never gives the same bytes.
    again = cipher.seal(data, context)
    assert again != sealed and again[HEADER : HEADER + 12] != sealed[HEADER : HEADER + 12]


def test_key_id_identifies_the_key_without_revealing_it() -> None:
    a, b = AtRestCipher(KEY), AtRestCipher(OTHER_KEY)
    assert a.key_id == AtRestCipher(bytearray(KEY)).key_id and len(a.key_id) == 16
    assert a.key_id != b.key_id
    assert KEY.hex()[:16] not in a.key_id and a.key_id not in repr(KEY)
    assert repr(a) == f"AtRestCipher(key_id={a.key_id})"


def test_wrong_key_is_a_key_mismatch_naming_both_keys() -> None:
    sealed = AtRestCipher(KEY).seal(b"model", "models.blob:job=1:round=1")
    other = AtRestCipher(OTHER_KEY)
    with pytest.raises(KeyMismatchError) as excinfo:
        other.open(sealed, "models.blob:job=1:round=1")
    message = str(excinfo.value)
    assert AtRestCipher(KEY).key_id in message and other.key_id in message
    assert "coordinator kit that wrote it" in message


@pytest.mark.parametrize(
    ("where", "error", "match"),
    [
        (0, StoreError, "not a sealed blob"),  # magic
        (4, StoreError, "format version 0"),  # version byte
        (5, KeyMismatchError, "under key"),  # key id
        (HEADER, StoreError, "failed authentication"),  # nonce
        (HEADER + 12, StoreError, "failed authentication"),  # ciphertext
        (-1, StoreError, "failed authentication"),  # tag
    ],
)
def test_tampered_blob_is_refused(where: int, error: type[Exception], match: str) -> None:
    cipher = AtRestCipher(KEY)
    sealed = bytearray(cipher.seal(b"accountant state", "ctx"))
    sealed[where] ^= 0x01
    with pytest.raises(error, match=match):
        cipher.open(bytes(sealed), "ctx")


def test_blob_moved_to_another_row_or_truncated_is_refused() -> None:
    cipher = AtRestCipher(KEY)
    sealed = cipher.seal(b"round 1 model", model_context(1, 1))
    with pytest.raises(StoreError, match="moved from another row"):
        cipher.open(sealed, model_context(1, 2))
    with pytest.raises(StoreError, match="failed authentication"):
        cipher.open(sealed, model_context(2, 1))
    with pytest.raises(StoreError, match=r"not a sealed blob \(40 bytes\)"):
        cipher.open(sealed[:40], model_context(1, 1))


@pytest.mark.parametrize("key", [b"", b"k" * 16, b"k" * 31, b"k" * 33, "k" * 32])
def test_key_must_be_32_bytes(key: object) -> None:
    with pytest.raises(InvalidConfigError, match="at_rest_key must be 32 bytes"):
        AtRestCipher(key)  # type: ignore[arg-type]


# -- the store ----------------------------------------------------------------------


def _raw_model(store: RoundStore, job_id: int, number: int) -> tuple[bytes, str, str]:
    with store.engine.connect() as conn:
        blob, at_rest, sha = conn.execute(
            text("SELECT blob, at_rest, sha256 FROM models WHERE job_id = :j AND round = :r"),
            {"j": job_id, "r": number},
        ).one()
    return bytes(blob), at_rest, sha


def test_plaintext_models_and_states_are_sealed(backend: StoreTarget, data: Rounds) -> None:
    with backend.open(at_rest_key=KEY) as store:
        assert store.encrypts_at_rest and store.at_rest_key_id == AtRestCipher(KEY).key_id
        job = store.open_job("j", CONFIG)
        commit = _plain_commit(data, 1)
        store.commit_round(job.id, commit)
        plain = commit.model.blob
        raw, at_rest, sha = _raw_model(store, job.id, 1)
        assert (at_rest, len(raw)) == ("aes-256-gcm", len(plain) + OVERHEAD)
        # Not one 16-byte window of the model's float64 bytes is stored.
        assert not any(chunk in raw for chunk in _chunks(plain))
        assert AtRestCipher(KEY).open(raw, model_context(job.id, 1)) == plain
        # The hash (and the audit event) bind the model itself, not its encryption.
        assert sha == hashlib.sha256(plain).hexdigest()
        event = store.audit_events(job.id)[-1]
        assert event.detail["model_sha256"] == sha
        got = store.latest_model(job.id)
        assert got is not None and got.kind == "plain"
        np.testing.assert_array_equal(np.frombuffer(got.blob), _weights(1))
        # Accountant states: base64 of sealed JSON, read back whole through rounds().
        (view,) = store.rounds(job.id)
        assert view.participations == commit.participations
        with store.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT hospital, accountant_state, at_rest FROM privacy_ledger "
                    "WHERE job_id = :j ORDER BY hospital"
                ),
                {"j": job.id},
            ).all()
        assert [(h, r) for h, _, r in rows] == [
            ("hospital-1", "aes-256-gcm"),
            ("hospital-2", "aes-256-gcm"),
        ]
        for (hospital, state, _), p in zip(rows, commit.participations, strict=True):
            sealed = base64.b64decode(state, validate=True)
            assert b"history" not in sealed and p.accountant_state is not None
            context = state_context(job.id, hospital, 1)
            assert AtRestCipher(KEY).open(sealed, context).decode() == p.accountant_state


def test_bfv_models_are_stored_as_they_are(backend: StoreTarget, data: Rounds) -> None:
    with backend.open(at_rest_key=KEY) as store:
        job = store.open_job("j", CONFIG)
        store.commit_round(job.id, data.commit(1))
        raw, at_rest, sha = _raw_model(store, job.id, 1)
        assert (raw, at_rest, sha) == (data.blob(1), "none", hashlib.sha256(raw).hexdigest())


def test_without_a_key_blobs_are_stored_as_is(backend: StoreTarget, data: Rounds) -> None:
    with backend.open() as store:
        assert not store.encrypts_at_rest and store.at_rest_key_id is None
        job = store.open_job("j", CONFIG)
        commit = _plain_commit(data, 1)
        store.commit_round(job.id, commit)
        raw, at_rest, _ = _raw_model(store, job.id, 1)
        assert (raw, at_rest) == (commit.model.blob, "none")  # the control of the test above


def test_sqlite_file_on_disk_holds_no_plaintext(tmp_path: Path, data: Rounds) -> None:
    for key, expect_found in ((KEY, False), (None, True)):
        path = tmp_path / f"{key is None}" / "fedvault.sqlite"
        path.parent.mkdir()
        with RoundStore(sqlite_url(path), at_rest_key=key) as store:
            job = store.open_job("j", CONFIG)
            store.commit_round(job.id, _plain_commit(data, 1))
            with store.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        disk = b"".join(p.read_bytes() for p in path.parent.iterdir())
        found = [c for c in _chunks(_weights(1).tobytes()) if c in disk]
        # 16 KiB of float64 = 1024 windows; without a key all but the few that straddle
        # an overflow-page boundary are on disk, with the key none is.
        assert len(found) == 0 if key else len(found) >= 1000
        assert (b'"history"' in disk) is expect_found


def test_reopening_with_keys(durable_backend: StoreTarget, data: Rounds) -> None:
    # Rows written without a key stay readable once a key is configured.
    with durable_backend.open(at_rest_key=None) as store:
        job = store.open_job("j", CONFIG)
        store.commit_round(job.id, _plain_commit(data, 1))
    with durable_backend.open(at_rest_key=KEY) as store:
        got = store.latest_model(job.id)
        assert got is not None and got.blob == _weights(1).tobytes()
        store.commit_round(job.id, _plain_commit(data, 2))
        assert _raw_model(store, job.id, 2)[1] == "aes-256-gcm"
        assert _raw_model(store, job.id, 1)[1] == "none"
    # Another key is refused at open, before anything is read.
    with pytest.raises(KeyMismatchError, match="encrypted at rest under key") as excinfo:
        durable_backend.open(at_rest_key=OTHER_KEY)
    assert AtRestCipher(KEY).key_id in str(excinfo.value)
    # Without the key: numbers are readable, sealed blobs are not, and nothing
    # plaintext may be written into an encrypted store.
    with durable_backend.open(at_rest_key=None) as reader:
        assert reader.at_rest_key_id == AtRestCipher(KEY).key_id
        assert not reader.encrypts_at_rest
        views = reader.rounds(job.id)
        assert [v.number for v in views] == [1, 2]
        assert views[0].participations[0].accountant_state == json.dumps(
            {"history": [[1.1, 0.01, 10]]}
        )
        assert [p.accountant_state for p in views[1].participations] == [None, None]
        assert views[1].participations[0].epsilon == pytest.approx(0.61)
        with pytest.raises(StoreError, match="encrypted at rest; open the store with"):
            reader.latest_model(job.id)
        before = reader.last_committed_round(job.id), len(reader.audit_events())
        with pytest.raises(StoreError, match="opened without its key"):
            reader.commit_round(job.id, _plain_commit(data, 3))
        assert (reader.last_committed_round(job.id), len(reader.audit_events())) == before


@pytest.mark.parametrize("column", ["models.blob", "privacy_ledger.accountant_state"])
def test_tampered_or_swapped_rows_are_refused(
    backend: StoreTarget, data: Rounds, column: str
) -> None:
    with backend.open(at_rest_key=KEY) as store:
        job = store.open_job("j", CONFIG)
        for number in (1, 2):
            store.commit_round(job.id, _plain_commit(data, number))
        table, name = column.split(".")
        with store.engine.begin() as conn:
            if table == "models":  # round 1's blob put in place of round 2's
                conn.execute(
                    text(
                        "UPDATE models SET blob = (SELECT blob FROM models WHERE round = 1) "
                        "WHERE round = 2"
                    )
                )
            else:  # one base64 character changed
                (row_id, state) = conn.execute(
                    text(f"SELECT id, {name} FROM {table} WHERE round = 2 ORDER BY id LIMIT 1")
                ).one()
                flipped = state[:20] + ("A" if state[20] != "A" else "B") + state[21:]
                conn.execute(
                    text(f"UPDATE {table} SET {name} = :v WHERE id = :id"),
                    {"v": flipped, "id": row_id},
                )
        with pytest.raises(StoreError, match="failed authentication"):
            if table == "models":
                store.latest_model(job.id)
            else:
                store.rounds(job.id)
