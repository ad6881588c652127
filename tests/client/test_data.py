"""Hospital data: the data spec, the CSV/Parquet/entry-point adapters and their refusals."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from fedvault.client.data import (
    DataSpec,
    HospitalData,
    load_hospital_data,
    validate_against_model,
    write_csv_partition,
    write_spec,
)
from fedvault.errors import DataError

NAMES = ["row_id", "age", "marker"]


def _records(n0: int = 40, n1: int = 60, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first column is the row index, so a split can be traced back."""
    rng = np.random.default_rng(seed)
    n = n0 + n1
    x = np.column_stack([np.arange(n), rng.normal(50, 10, n), rng.normal(0, 1, n)])
    y = np.array([0] * n0 + [1] * n1)[rng.permutation(n)]
    return x, y


def _csv_spec(tmp_path: Path, x: np.ndarray, y: np.ndarray, **fields: Any) -> DataSpec:
    write_csv_partition(tmp_path / "train.csv", x, y, feature_names=NAMES, label="diagnosis")
    spec = {
        "format": "csv",
        "train": "train.csv",
        "label": "diagnosis",
        "features": NAMES,
        "labels": [0, 1],
        "min_records": 20,
        **fields,
    }
    return DataSpec.load(write_spec(tmp_path / "spec.toml", **spec))


def _write_text(tmp_path: Path, name: str, text: str, **fields: Any) -> DataSpec:
    (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    spec = {"format": "csv", "train": name, "label": "y", "features": ["a", "b"], "labels": [0, 1]}
    return DataSpec.load(write_spec(tmp_path / "spec.toml", **{**spec, **fields}))


def _refusal(spec: DataSpec) -> str:
    with pytest.raises(DataError) as info:
        load_hospital_data(spec)
    return str(info.value)


def _xy(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.tensors[0], dataset.tensors[1]


# --- CSV ---------------------------------------------------------------------------------


def test_csv_holdout_is_stratified_exact_and_deterministic(tmp_path: Path) -> None:
    x, y = _records(40, 60)
    data = load_hospital_data(_csv_spec(tmp_path, x, y, holdout=0.25, seed=7))
    x_train, y_train = _xy(data.train)
    x_test, y_test = _xy(data.test)
    assert (x_train.dtype, y_train.dtype) == (torch.float32, torch.int64)
    assert tuple(x_train.shape) == (75, 3) and tuple(x_test.shape) == (25, 3)
    assert data.num_features == 3 and data.labels == (0, 1)
    # Stratified: 25% of each class held out (10 of 40, 15 of 60).
    assert torch.bincount(y_test).tolist() == [10, 15]
    assert torch.bincount(y_train).tolist() == [30, 45]
    assert data.summary == "75 training / 25 held-out records, 3 features, labels {0: 30, 1: 45}"
    # Train and test partition the file, and each row keeps its values and label.
    ids = torch.cat([x_train[:, 0], x_test[:, 0]]).long()
    assert sorted(ids.tolist()) == list(range(100))
    np.testing.assert_allclose(x_train.numpy(), x[ids[:75]].astype(np.float32), rtol=0)
    np.testing.assert_array_equal(y_test.numpy(), y[ids[75:]])
    # Same seed, same split; another seed, another split.
    again = load_hospital_data(_csv_spec(tmp_path, x, y, holdout=0.25, seed=7))
    assert torch.equal(_xy(again.test)[0], x_test)
    other = load_hospital_data(_csv_spec(tmp_path, x, y, holdout=0.25, seed=8))
    assert not torch.equal(_xy(other.test)[0][:, 0], x_test[:, 0])


def test_csv_with_test_file_keeps_order_and_float64(tmp_path: Path) -> None:
    x, y = _records(30, 30)
    write_csv_partition(tmp_path / "test.csv", x[:8], y[:8], feature_names=NAMES, label="diagnosis")
    data = load_hospital_data(_csv_spec(tmp_path, x, y, test="test.csv", dtype="float64"))
    x_train, y_train = _xy(data.train)
    assert x_train.dtype == torch.float64
    np.testing.assert_array_equal(x_train.numpy(), x)  # repr round-trips float64 exactly
    np.testing.assert_array_equal(y_train.numpy(), y)
    np.testing.assert_array_equal(_xy(data.test)[0].numpy(), x[:8])
    assert data.summary.startswith("60 training / 8 held-out records")


def test_csv_columns_are_taken_in_spec_order_and_extras_ignored(tmp_path: Path) -> None:
    rows = "".join(f"{i},{i % 2},note{i},{10 * i}\n" for i in range(20))
    spec = _write_text(tmp_path, "t.csv", "b,y,comment,a\n" + rows, min_records=10, holdout=0.5)
    data = load_hospital_data(spec)
    x, y = _xy(data.train)
    # Column a (10 * i) first, then b (i), as the spec lists them; label y = i % 2.
    np.testing.assert_array_equal(x[:, 0].numpy(), 10 * x[:, 1].numpy())
    np.testing.assert_array_equal(y.numpy(), x[:, 1].numpy().astype(int) % 2)


# --- Parquet -----------------------------------------------------------------------------


def test_parquet_happy_path(tmp_path: Path) -> None:
    x, y = _records(25, 25)
    table = pa.table(
        {
            "marker": x[:, 2],
            "site": ["A"] * 50,  # undeclared, non-numeric: ignored
            "row_id": x[:, 0].astype(np.int64),
            "age": x[:, 1].astype(np.float32),
            "diagnosis": y.astype(np.int8),
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    pq.write_table(table.slice(0, 5), tmp_path / "test.parquet")
    spec = DataSpec.load(
        write_spec(
            tmp_path / "spec.toml",
            format="parquet",
            train="train.parquet",
            test="test.parquet",
            label="diagnosis",
            features=NAMES,
            labels=[0, 1],
        )
    )
    data = load_hospital_data(spec)
    x_train, y_train = _xy(data.train)
    assert (x_train.dtype, y_train.dtype, tuple(x_train.shape)) == (
        torch.float32,
        torch.int64,
        (50, 3),
    )
    np.testing.assert_allclose(x_train.numpy(), x.astype(np.float32), rtol=1e-7)
    np.testing.assert_array_equal(y_train.numpy(), y)
    assert len(data.test) == 5  # type: ignore[arg-type]


def _parquet_spec(tmp_path: Path, columns: dict[str, Any]) -> DataSpec:
    pq.write_table(pa.table(columns), tmp_path / "d.parquet")
    return DataSpec.load(
        write_spec(
            tmp_path / "spec.toml",
            format="parquet",
            train="d.parquet",
            label="y",
            features=["a"],
            labels=[0, 1],
            min_records=1,
        )
    )


def test_parquet_nulls_and_text_are_refused_with_row(tmp_path: Path) -> None:
    a = [1.0, 2.0, None, 4.0, None, 6.0]
    msg = _refusal(_parquet_spec(tmp_path, {"a": a, "y": [0, 1] * 3}))
    assert "2 missing or non-finite" in msg and "'a': 2 (first at row 2)" in msg
    msg = _refusal(_parquet_spec(tmp_path, {"a": ["1", "2", "x7", "4"], "y": [0, 1, 0, 1]}))
    assert "non-numeric value 'x7' at row 2" in msg
    ts = pa.array([0, 1, 2, 3], pa.timestamp("s"))
    assert "has type timestamp" in _refusal(_parquet_spec(tmp_path, {"a": ts, "y": [0, 1, 0, 1]}))
    (tmp_path / "d.parquet").write_text("not parquet")
    assert "cannot be read as Parquet" in _refusal(DataSpec.load(tmp_path / "spec.toml"))


# --- refusals (CSV) ----------------------------------------------------------------------


def _rows(n: int, fmt: str = "{i},{j},{k}") -> str:
    return "".join(fmt.format(i=i, j=i * 0.5, k=i % 2) + "\n" for i in range(n))


def test_missing_columns_lists_them_and_the_columns_found(tmp_path: Path) -> None:
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,bb,y\n" + _rows(30)))
    assert "declared columns ['b'] not found" in msg and "['a', 'bb', 'y']" in msg
    msg = _refusal(_write_text(tmp_path, "t.csv", "a;b;y\n1;2;0\n"))
    assert "';' or tab separated" in msg
    msg = _refusal(_write_text(tmp_path, "t.csv", _rows(30)))
    assert "add a header row" in msg


def test_non_numeric_value_names_line_and_column(tmp_path: Path) -> None:
    text = "a,b,y\n" + _rows(5) + "1,high,0\n" + _rows(20) + "2,low,1\n"
    msg = _refusal(_write_text(tmp_path, "t.csv", text))
    assert "column 'b' has non-numeric value 'high' at line 7" in msg
    assert "2 such values" in msg
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n" + _rows(25, "{i},{j},benign")))
    assert "column 'y'" in msg and "map class names to integer labels" in msg


def test_missing_values_count_and_first_line(tmp_path: Path) -> None:
    text = "a,b,y\n" + _rows(10) + "1,,0\n2,NaN,1\n3,NA,0\nnan,4,1\n" + _rows(20)
    msg = _refusal(_write_text(tmp_path, "t.csv", text))
    assert "4 missing or non-finite values" in msg
    assert "'a': 1 (first at line 15)" in msg and "'b': 3 (first at line 12)" in msg
    assert "impute" in msg
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n" + _rows(25) + "inf,1,0\n"))
    assert "1 missing or non-finite" in msg and "line 27" in msg


def test_labels_outside_declared_set_name_values_and_lines(tmp_path: Path) -> None:
    text = "a,b,y\n" + _rows(24) + "1,1,2\n1,1,7\n1,1,2\n"
    msg = _refusal(_write_text(tmp_path, "t.csv", text))
    assert "values [2, 7] outside the declared labels [0, 1]" in msg
    assert "line 26, line 27, line 28" in msg
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n" + _rows(24) + "1,1,0.5\n"))
    assert "non-integer value 0.5 at line 26" in msg


def test_too_few_records(tmp_path: Path) -> None:
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n" + _rows(22), min_records=20))
    # 22 records, 4 held out (2 per class at holdout 0.2), 18 left.
    assert "22 records" in msg and "4 are held out" in msg and "leaves 18" in msg
    assert "min_records = 20" in msg
    (tmp_path / "test.csv").write_text("a,b,y\n" + _rows(4))
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n" + _rows(9), test="test.csv"))
    assert "9 training records, fewer than min_records = 20" in msg


def test_declared_label_absent_from_train(tmp_path: Path) -> None:
    text = "a,b,y\n" + _rows(30, "{i},{j},0")
    msg = _refusal(_write_text(tmp_path, "t.csv", text))
    assert "declared labels [1] never occur" in msg and "allow_missing_labels = true" in msg
    data = load_hospital_data(_write_text(tmp_path, "t.csv", text, allow_missing_labels=True))
    assert data.summary.endswith("labels {0: 24, 1: 0}")


def test_empty_test_set_and_malformed_files(tmp_path: Path) -> None:
    (tmp_path / "test.csv").write_text("a,b,y\n")
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n" + _rows(30), test="test.csv"))
    assert "test set is empty" in msg
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,y\n1,2\n" + _rows(30)))
    assert "line 2 has 2 fields, the header has 3" in msg
    assert "is empty" in _refusal(_write_text(tmp_path, "t.csv", ""))
    msg = _refusal(_write_text(tmp_path, "t.csv", "a,b,a,y\n" + _rows(30, "{i},{j},{i},{k}")))
    assert "columns ['a'] appear more than once" in msg
    (tmp_path / "t.csv").unlink()
    assert "t.csv (named in the data spec) not found" in _refusal(
        DataSpec.load(tmp_path / "spec.toml")
    )


# --- the spec file -----------------------------------------------------------------------


def _spec_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(DataError) as info:
        DataSpec.load(path)
    return str(info.value)


BASE = 'format = "csv"\ntrain = "t.csv"\nlabel = "y"\nlabels = [0, 1]\n'


def test_spec_refusals(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass --data with the hospital's data spec"):
        DataSpec.load(tmp_path / "nope.toml")
    assert "not valid TOML" in _spec_error(tmp_path, "format = csv\n")
    msg = _spec_error(tmp_path, BASE + 'features = ["a"]\nlabel_column = "y"\n')
    assert "unknown keys ['label_column']" in msg and "'min_records'" in msg
    msg = _spec_error(tmp_path, BASE + 'features = ["a", "b", "a"]\n')
    assert "duplicate feature names ['a']" in msg
    assert "also listed in features" in _spec_error(tmp_path, BASE + 'features = ["a", "y"]\n')
    assert "features must be" in _spec_error(tmp_path, BASE)
    msg = _spec_error(tmp_path, BASE.replace('"csv"', '"xlsx"') + 'features = ["a"]\n')
    assert "format must be 'csv', 'parquet' or 'entrypoint'; got 'xlsx'" in msg
    msg = _spec_error(tmp_path, 'format = "csv"\nlabels = [0, 1]\nlabel = "y"\nfeatures = ["a"]\n')
    assert "train must be a file name" in msg and "it is missing" in msg
    assert "seed must be" in _spec_error(tmp_path, BASE + 'features = ["a"]\nseed = true\n')
    assert "dtype must be" in _spec_error(tmp_path, BASE + 'features = ["a"]\ndtype = "int8"\n')
    msg = _spec_error(tmp_path, BASE.replace("[0, 1]", "[[0], 1]") + 'features = ["a"]\n')
    assert "labels must be" in msg
    msg = _spec_error(tmp_path, BASE.replace("[0, 1]", "[0, 0]") + 'features = ["a"]\n')
    assert "labels must be a list of at least two distinct" in msg
    assert "holdout must be" in _spec_error(tmp_path, BASE + 'features = ["a"]\nholdout = 1.0\n')
    msg = _spec_error(tmp_path, BASE + 'features = ["a"]\nentry_point = "m:f"\n')
    assert "['entry_point'] do not apply to format = 'csv'" in msg
    entry = 'format = "entrypoint"\nlabels = [0, 1]\n'
    msg = _spec_error(tmp_path, entry + 'entry_point = "m:f"\ntrain = "t"\nholdout = 0.1\n')
    assert "['train', 'holdout'] do not apply to format = 'entrypoint'" in msg
    msg = _spec_error(tmp_path, entry + 'entry_point = "m.f"\n')
    assert "entry_point must be 'package.module:function'" in msg


def test_spec_paths_resolve_against_spec_dir_and_defaults(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    path = tmp_path / "site" / "spec.toml"
    path.write_text(BASE + 'features = ["a"]\n')
    spec = DataSpec.load(path)
    assert spec.train == tmp_path.resolve() / "site" / "t.csv" and spec.test is None
    assert (spec.holdout, spec.seed, spec.min_records, spec.dtype) == (0.2, 0, 20, "float32")
    assert spec.labels == (0, 1) and spec.features == ("a",)


def test_write_spec_round_trips_and_refuses_bad_specs(tmp_path: Path) -> None:
    path = write_spec(
        tmp_path / "a" / "spec.toml",
        format="csv",
        train='odd "name"\\é\t.csv',
        label="y",
        features=["x 1", "ü"],
        labels=[0, 1, 2],
        holdout=0.125,
        allow_missing_labels=True,
    )
    spec = DataSpec.load(path)
    assert spec.train is not None and spec.train.name == 'odd "name"\\é\t.csv'
    assert spec.features == ("x 1", "ü") and spec.labels == (0, 1, 2)
    assert spec.holdout == 0.125 and spec.allow_missing_labels is True
    with pytest.raises(DataError, match="unknown keys"):
        write_spec(tmp_path / "b.toml", format="csv", colour="red")
    assert not (tmp_path / "b.toml").exists()
    with pytest.raises(DataError, match="is not a str"):
        write_spec(tmp_path / "c.toml", format={"a": 1})


def test_write_csv_partition_refuses_misaligned_arrays(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="do not line up"):
        write_csv_partition(
            tmp_path / "x.csv", np.zeros((4, 2)), np.zeros(3), feature_names=["a", "b"]
        )
    with pytest.raises(DataError, match="do not line up"):
        write_csv_partition(tmp_path / "x.csv", np.zeros((4, 2)), np.zeros(4), feature_names=["a"])


# --- entry points ------------------------------------------------------------------------

LOADERS = """
import numpy as np
import torch
from torch.utils.data import TensorDataset

def _ds(n, labels=(0, 1), dtype=torch.float32):
    x = torch.arange(n * 4, dtype=dtype).reshape(n, 4)
    y = torch.tensor([labels[i % len(labels)] for i in range(n)])
    return TensorDataset(x, y)

def good(spec_dir):
    assert (spec_dir / "spec.toml").is_file()
    return _ds(30), _ds(6)

def images(spec_dir):
    x = torch.zeros(24, 1, 2, 3)
    return [(x[i], int(i % 2)) for i in range(24)], [(x[0], np.int64(1))]

def one_class(spec_dir):
    return _ds(30, labels=(0,)), _ds(6)

def bad_label(spec_dir):
    return _ds(30), _ds(6, labels=(0, 1, 5))

def as_float64(spec_dir):
    return _ds(30, dtype=torch.float64), _ds(6)

def a_list(spec_dir):
    return [1, 2, 3]

def tuples_of_three(spec_dir):
    return [(torch.zeros(2), 0, "x")] * 30, _ds(6)

def with_nan(spec_dir):
    train = _ds(30)
    train.tensors[0][3, 1] = float("nan")
    return train, _ds(6)

def broken(spec_dir):
    raise FileNotFoundError("images/ missing")

NOT_A_FUNCTION = 3
"""


@pytest.fixture
def loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "fv_test_loaders.py").write_text(LOADERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("fv_test_loaders", None)


def _entry(directory: Path, target: str, **fields: Any) -> DataSpec:
    spec = {"format": "entrypoint", "entry_point": target, "labels": [0, 1], **fields}
    return DataSpec.load(write_spec(directory / "spec.toml", **spec))


def test_entrypoint_happy_paths(loaders: Path) -> None:
    data = load_hospital_data(_entry(loaders, "fv_test_loaders:good"))
    assert data.num_features == 4 and len(data.train) == 30  # type: ignore[arg-type]
    assert data.summary == "30 training / 6 held-out records, 4 features, labels {0: 15, 1: 15}"
    data = load_hospital_data(_entry(loaders, "fv_test_loaders:images"))
    assert data.num_features == (1, 2, 3)
    assert data.summary == "24 training / 1 held-out records, 1x2x3 features, labels {0: 12, 1: 12}"


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("fv_no_such_module:load", "cannot import 'fv_no_such_module'"),
        ("fv_test_loaders:missing", "fv_test_loaders.missing does not exist"),
        ("fv_test_loaders:NOT_A_FUNCTION", "is a int, not callable"),
        ("fv_test_loaders:a_list", "returned list; it must return a tuple"),
        (
            "fv_test_loaders:tuples_of_three",
            "train item 0 is tuple; items must be (features, label)",
        ),
        (
            "fv_test_loaders:as_float64",
            "features are torch.float64, the data spec declares a float32",
        ),
        ("fv_test_loaders:with_nan", "train item 3: features contain NaN"),
        ("fv_test_loaders:bad_label", "test labels [5] are outside the declared labels [0, 1]"),
        ("fv_test_loaders:one_class", "declared labels [1] never occur"),
        ("fv_test_loaders:broken", "raised FileNotFoundError: images/ missing"),
    ],
)
def test_entrypoint_refusals(loaders: Path, target: str, words: str) -> None:
    assert words in _refusal(_entry(loaders, target))


# --- the model ---------------------------------------------------------------------------


def _data(tmp_path: Path, n_features: int = 3, **fields: Any) -> HospitalData:
    x, y = _records(20, 20)
    spec = _csv_spec(tmp_path, x[:, :n_features], y, features=NAMES[:n_features], **fields)
    return load_hospital_data(spec)


def test_validate_against_model(tmp_path: Path) -> None:
    data = _data(tmp_path)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    validate_against_model(data, model)  # fits: no error
    assert model.training  # the mode is restored
    with pytest.raises(DataError, match="model expects 4 features, data has 3"):
        validate_against_model(data, nn.Linear(4, 2))
    with pytest.raises(DataError, match="model has 1 logits but the data spec declares labels"):
        validate_against_model(data, nn.Linear(3, 1))
    with pytest.raises(DataError, match=r"data of shape \(3,\) \(torch.float64\) fails"):
        validate_against_model(_data(tmp_path, dtype="float64"), model)  # float32 weights
    conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(DataError, match=r"data of shape \(3,\)"):
        validate_against_model(data, conv)


# --- tasks: regression targets, a task's own reader --------------------------------------


def test_regression_targets_are_read_as_floats_without_a_label_set(tmp_path: Path) -> None:
    from fedvault.client.data import load_task_data
    from fedvault.examples.diabetes import TASK as DIABETES

    x, _ = _records()
    y = np.linspace(-2.5, 3.25, len(x))
    write_csv_partition(tmp_path / "train.csv", x, y, feature_names=NAMES, label="progression")
    spec = DataSpec.load(
        write_spec(
            tmp_path / "spec.toml",
            format="csv",
            train="train.csv",
            label="progression",
            features=NAMES,
            min_records=20,
        )
    )
    data = load_task_data(DIABETES, spec)
    _, targets = _xy(data.train)
    assert targets.dtype == torch.float32 and data.labels == ()
    held = len(data.test)  # type: ignore[arg-type]
    assert held == 20 and len(data.train) == 80  # type: ignore[arg-type]
    everything = np.sort(np.concatenate([targets.numpy(), _xy(data.test)[1].numpy()]))
    np.testing.assert_allclose(everything, np.sort(y).astype(np.float32))
    assert "targets in [" in data.summary
    # The same spec for a classification task: it needs its labels declared.
    from fedvault.examples.breast_cancer import TASK as BREAST

    with pytest.raises(DataError, match="declares no labels"):
        load_task_data(BREAST, spec)


def test_a_tasks_own_reader_is_checked_like_an_entry_point(tmp_path: Path) -> None:
    import dataclasses

    from fedvault.client.data import load_task_data
    from fedvault.examples.breast_cancer import TASK as BREAST

    spec = _csv_spec(tmp_path, *_records())

    def images(_spec: DataSpec) -> tuple[Any, Any]:
        x = torch.zeros(30, 1, 4, 4)
        y = torch.tensor([0, 1] * 15)
        return torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(x, y)

    data = load_task_data(dataclasses.replace(BREAST, site_data=images), spec)
    assert data.num_features == (1, 4, 4) and len(data.train) == 30  # type: ignore[arg-type]

    def broken(_spec: DataSpec) -> tuple[Any, Any]:
        raise KeyError("scan_id")

    with pytest.raises(DataError, match=r"could not read the data spec.*KeyError"):
        load_task_data(dataclasses.replace(BREAST, site_data=broken), spec)
