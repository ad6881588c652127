"""``array_from_npy``: numpy's own ``np.load``, bit for bit, without re-parsing known headers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedvault import npz
from fedvault.errors import MalformedUpdateError
from fedvault.messages import payload_from_record

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5),  # 0-d
    np.zeros((0,), dtype=np.int64),
    np.zeros((2, 0, 5), dtype=np.float16),
    np.arange(-5, 5, dtype=np.int8).reshape(1, 1, 1, 1, 10),
    np.array([True, False, True]),
    np.arange(6, dtype=np.complex64) * 1j,
    np.arange(7, dtype=">f4"),  # big-endian
    np.random.default_rng(0).standard_normal((300, 700)).astype(np.float32),
    np.asfortranarray(np.arange(20, dtype=np.float32).reshape(4, 5)),  # np.save marks it Fortran
]


def _load(data: bytes) -> np.ndarray:
    return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))


def _same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()
    assert got.flags.writeable


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_it_decodes_what_flower_encodes_exactly_as_np_load(value: np.ndarray) -> None:
    array = Array(value)
    got = npz.array_from_npy(array.data, array.dtype, array.shape)
    _same(got, _load(array.data))
    _same(got, array.numpy())
    assert not np.shares_memory(got, np.frombuffer(array.data, dtype=np.uint8))


@pytest.mark.parametrize("value", CASES[:-1], ids=lambda v: f"{v.dtype}{v.shape}")
def test_a_header_seen_before_is_not_parsed_again(
    value: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    array = Array(value)
    npz.array_from_npy(array.data, array.dtype, array.shape)  # numpy writes the header once

    def parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("np.load was called for a known header")

    monkeypatch.setattr(np, "load", parse)
    _same(npz.array_from_npy(array.data, array.dtype, array.shape), value)


def test_the_header_decides_when_the_metadata_disagrees() -> None:
    """The bytes' own header wins, as in ``Array.numpy()``: no reinterpretation."""
    array = Array(np.arange(12, dtype=np.float32).reshape(3, 4))
    for dtype, shape in [("float64", (3, 2)), ("float32", (4, 3)), ("int32", (12,))]:
        _same(npz.array_from_npy(array.data, dtype, shape), array.numpy())
    with_tail = array.data + b"\x00" * 4  # trailing bytes: np.load's answer, whatever it is
    _same(npz.array_from_npy(with_tail, array.dtype, array.shape), _load(with_tail))


def test_bytes_numpy_refuses_are_refused_the_same_way() -> None:
    array = Array(np.arange(12, dtype=np.float32))
    for data in (array.data[:-1], array.data[:20], b"", b"not an npy file at all"):
        with pytest.raises((ValueError, EOFError)) as ours:
            npz.array_from_npy(data, array.dtype, array.shape)
        with pytest.raises((ValueError, EOFError)) as numpys:
            _load(data)
        assert type(ours.value) is type(numpys.value)
    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        npz.array_from_npy(objects.getvalue(), "object", (1,))


def test_a_corrupt_array_in_a_reply_is_a_malformed_update() -> None:
    good = Array(np.arange(12, dtype=np.float32))
    cut = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=good.data[:-3])
    with pytest.raises(MalformedUpdateError, match="'w' cannot be decoded"):
        payload_from_record(ArrayRecord({"w": cut}))
    other = Array(dtype=good.dtype, shape=good.shape, stype="torch.Tensor", data=good.data)
    with pytest.raises(MalformedUpdateError, match="not numpy"):
        payload_from_record(ArrayRecord({"w": other}))
