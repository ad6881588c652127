"""Packing named tensors into one flat vector and back."""

from __future__ import annotations

import numpy as np
import pytest

from fedvault.errors import MalformedUpdateError
from fedvault.privacy.packing import Layout, TensorSpec, flatten, unflatten
from fedvault.proto import update_pb2


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "conv.weight": rng.standard_normal((4, 3, 2)).astype(np.float32),
        "conv.bias": rng.standard_normal(4),
        "scale": np.asarray(2.5, dtype=np.float64),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "half": rng.standard_normal(5).astype(np.float16),
    }


def test_round_trip_restores_names_shapes_dtypes_values() -> None:
    model = _model(np.random.default_rng(0))
    layout, vector = flatten(model)
    assert vector.dtype == np.float64 and vector.ndim == 1
    assert layout.size == 24 + 4 + 1 + 0 + 5 == vector.size
    assert [t.name for t in layout.tensors] == list(model)
    # Mapping order, each tensor in C order.
    np.testing.assert_array_equal(vector[:24], model["conv.weight"].reshape(-1))
    np.testing.assert_array_equal(vector[24:28], model["conv.bias"])
    assert vector[28] == 2.5

    back = unflatten(layout, vector)
    assert list(back) == list(model)
    for name, arr in model.items():
        assert back[name].dtype == arr.dtype, name
        assert back[name].shape == arr.shape, name
        np.testing.assert_array_equal(back[name], arr)


def test_flatten_returns_a_fresh_vector() -> None:
    model = {"w": np.ones(3)}
    _, vector = flatten(model)
    vector *= 7.0
    np.testing.assert_array_equal(model["w"], np.ones(3))


def test_flatten_non_contiguous_is_c_order() -> None:
    arr = np.arange(6, dtype=np.float64).reshape(2, 3).T  # a transposed view
    layout, vector = flatten({"t": arr})
    np.testing.assert_array_equal(vector, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0])
    np.testing.assert_array_equal(unflatten(layout, vector)["t"], arr)


def test_unflatten_returns_copies() -> None:
    layout, vector = flatten({"w": np.zeros(3)})
    out = unflatten(layout, vector)
    vector[:] = 5.0
    np.testing.assert_array_equal(out["w"], np.zeros(3))


@pytest.mark.parametrize(
    "bad", [np.arange(3), np.array([True, False]), np.ones(2, dtype=np.complex128)]
)
def test_flatten_refuses_non_float(bad: np.ndarray) -> None:
    with pytest.raises(MalformedUpdateError, match="'counter'"):
        flatten({"ok": np.ones(2), "counter": bad})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_flatten_refuses_non_finite_naming_tensor(value: float) -> None:
    w2 = np.ones(4, dtype=np.float32)
    w2[2] = value
    with pytest.raises(MalformedUpdateError, match=r"'w2'.*NaN or infinite"):
        flatten({"w1": np.ones(3), "w2": w2, "w3": np.ones(2)})


def test_flatten_refuses_bad_names() -> None:
    with pytest.raises(MalformedUpdateError, match="names"):
        flatten({"": np.ones(2)})


def test_unflatten_size_mismatch() -> None:
    layout, vector = flatten({"a": np.ones(3), "b": np.ones((2, 2))})
    with pytest.raises(MalformedUpdateError, match="7 values"):
        unflatten(layout, vector[:-1])
    with pytest.raises(MalformedUpdateError):
        unflatten(layout, np.ones((7, 1)))


def test_proto_round_trip() -> None:
    layout, _ = flatten(_model(np.random.default_rng(1)))
    pb = layout.to_proto()
    assert isinstance(pb, update_pb2.Layout)
    again = Layout.from_proto(update_pb2.Layout.FromString(pb.SerializeToString()))
    assert again == layout
    assert again.tensors[2] == TensorSpec(name="scale", shape=(), dtype="float64")
    assert again.size == 34


def _pb(*specs: tuple[str, list[int], str]) -> update_pb2.Layout:
    return update_pb2.Layout(
        tensors=[update_pb2.TensorSpec(name=n, shape=s, dtype=d) for n, s, d in specs]
    )


@pytest.mark.parametrize(
    ("pb", "needle"),
    [
        (_pb(("a", [2, -1], "float32")), "negative dimension"),
        (_pb(("a", [2], "int64")), "dtype 'int64'"),
        (_pb(("a", [2], "")), "dtype ''"),
        (_pb(("a", [2], "float32"), ("a", [3], "float32")), "twice"),
        (_pb(("", [2], "float32")), "without a name"),
    ],
)
def test_from_proto_validates(pb: update_pb2.Layout, needle: str) -> None:
    with pytest.raises(MalformedUpdateError, match=needle):
        Layout.from_proto(pb)


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_slices_and_scatter_stream_what_flatten_and_unflatten_hold_whole(size: int) -> None:
    from fedvault.privacy.packing import Scatter, iter_slices, layout_of

    rng = np.random.default_rng(size)
    model = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal(4),
        "c": rng.standard_normal((2, 2, 2)).astype(np.float16),
    }
    layout, vector = flatten(model)
    assert layout_of(model) == layout
    pieces = list(iter_slices(model, size))
    assert all(len(p) == size for p in pieces[:-1]) and 0 < len(pieces[-1]) <= size
    np.testing.assert_array_equal(np.concatenate(pieces), vector)
    scatter = Scatter(layout)
    for piece in pieces:
        scatter.write(np.concatenate([piece, np.zeros(2)]) if piece is pieces[-1] else piece)
    back = scatter.result()  # trailing padding (a last ciphertext's empty slots) is ignored
    for name, value in unflatten(layout, vector).items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)


def test_scatter_refuses_too_few_values() -> None:
    from fedvault.privacy.packing import Scatter

    layout, vector = flatten({"a": np.ones(5)})
    scatter = Scatter(layout)
    scatter.write(vector[:4])
    with pytest.raises(MalformedUpdateError, match="fewer values than its layout"):
        scatter.result()
