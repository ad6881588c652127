"""A hospital's data: the declared data spec, the adapters that read it, and validation.

``fedvault client start --data SPEC`` points at a small TOML *data spec* that
declares the schema (file format, feature columns in model order, label column,
label set, minimum size). Everything is checked here, before the first round,
and each failure is a :class:`DataError` naming the file, the column or row and
the fix: a hospital that joins with bad data either crashes mid-round or, worse,
sends an update that silently damages the consortium's model (one class only,
NaNs, shifted columns). Nothing is imputed or coerced: those are clinical
choices for the hospital's data steward, not for the training daemon.

Pure data handling: this module does not import Flower. The format is
documented, with a full example, in ``examples/hospital-data/README.md``.
"""

from __future__ import annotations

import csv
import importlib
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from fedvault.errors import DataError
from fedvault.task import Task

__all__ = [
    "DataSpec",
    "HospitalData",
    "load_hospital_data",
    "load_task_data",
    "validate_against_model",
    "write_csv_partition",
    "write_spec",
]

Format = Literal["csv", "parquet", "entrypoint"]
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Cells that mean "no value"; reported as missing rather than as non-numeric.
_MISSING = {"", "na", "n/a", "nan", "null", "none", "?"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip())


# key -> (valid?, what a valid value is): the whole schema of a data spec file.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v in ("csv", "parquet", "entrypoint"), "'csv', 'parquet' or 'entrypoint'"),
    "train": (_is_name, "a file name, relative to the data spec's directory"),
    "test": (_is_name, "a file name, relative to the data spec's directory"),
    "holdout": (lambda v: isinstance(v, int | float) and 0 < v < 1, "a fraction in (0, 1)"),
    "seed": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "label": (_is_name, "the label column's name"),
    "features": (
        lambda v: isinstance(v, list) and bool(v) and all(_is_name(f) for f in v),
        "a non-empty list of column names, in the model's input order",
    ),
    "labels": (
        lambda v: (
            isinstance(v, list)
            and all(_is_int(c) and c >= 0 for c in v)
            and len(set(v)) == len(v) >= 2
        ),
        "a list of at least two distinct class indices (integers >= 0)",
    ),
    "min_records": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "dtype": (lambda v: v in _DTYPES, "'float32' or 'float64'"),
    "entry_point": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[\w.]+:\w+", v) is not None,
        "'package.module:function'",
    ),
    "allow_missing_labels": (lambda v: isinstance(v, bool), "true or false"),
}
_REQUIRED = {
    # ``labels`` too, for a classification task: checked when the data is loaded
    # for a task (load_task_data), since only the task knows its kind.
    "table": ("format", "train", "label", "features"),
    "entrypoint": ("format", "entry_point"),
}
_TABLE_ONLY = ("train", "test", "holdout", "label", "features")
_README = "examples/hospital-data/README.md"
_SHOW = 5  # rows named in a message before "..."


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The declared schema of a hospital's data, read once from its TOML data spec.

    Paths are resolved against ``base_dir`` (the spec file's directory), so a
    spec and its files move together. See ``examples/hospital-data/README.md``.
    """

    format: Format
    base_dir: Path
    train: Path | None = None
    test: Path | None = None
    holdout: float = 0.2
    seed: int = 0
    label: str | None = None
    features: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()  # class indices; empty for a regression task
    min_records: int = 20
    entry_point: str | None = None
    dtype: str = "float32"
    allow_missing_labels: bool = False

    @classmethod
    def load(cls, path: Path) -> DataSpec:
        """Read and check a data spec file; every problem is a :class:`DataError`."""
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"data spec {path} not found: pass --data with the hospital's data spec "
                f"(see {_README})"
            )
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"data spec {path} is not valid TOML ({exc}); see {_README}") from exc
        return cls.from_mapping(raw, base_dir=path.resolve().parent, source=str(path))

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, object], *, base_dir: Path, source: str = "data spec"
    ) -> DataSpec:
        """Build a spec from parsed TOML; ``source`` names it in error messages."""
        unknown = sorted(set(raw) - set(_CHECKS))
        if unknown:
            raise DataError(
                f"{source}: unknown keys {unknown}; the known keys are {sorted(_CHECKS)} "
                f"(see {_README})"
            )
        kind = "entrypoint" if raw.get("format") == "entrypoint" else "table"
        absent = [key for key in _REQUIRED[kind] if key not in raw]
        for key in [*absent, *raw]:
            valid, want = _CHECKS[key]
            if key in absent or not valid(raw[key]):
                got = f"got {raw[key]!r}" if key in raw else "it is missing"
                raise DataError(f"{source}: {key} must be {want}; {got} (see {_README})")
        # Any: each value was checked against _CHECKS above.
        checked: Mapping[str, Any] = raw
        wrong = _TABLE_ONLY if kind == "entrypoint" else ("entry_point",)
        stray = [key for key in wrong if key in checked]
        if stray:
            raise DataError(
                f"{source}: {stray} do not apply to format = {checked['format']!r}; remove them "
                f"(see {_README})"
            )
        features = checked.get("features", [])
        dupes = sorted({f for f in features if features.count(f) > 1})
        if dupes:
            raise DataError(f"{source}: duplicate feature names {dupes}; list each column once")
        if checked.get("label") in features:
            raise DataError(
                f"{source}: the label column {checked['label']!r} is also listed in features; "
                "remove it from features (the model must not see the answer)"
            )
        base = Path(base_dir)
        return cls(
            format=checked["format"],
            base_dir=base,
            train=base / checked["train"] if "train" in checked else None,
            test=base / checked["test"] if "test" in checked else None,
            holdout=float(checked.get("holdout", 0.2)),
            seed=checked.get("seed", 0),
            label=checked.get("label"),
            features=tuple(features),
            labels=tuple(checked.get("labels", ())),
            min_records=checked.get("min_records", 20),
            entry_point=checked.get("entry_point"),
            dtype=checked.get("dtype", "float32"),
            allow_missing_labels=checked.get("allow_missing_labels", False),
        )


@dataclass(frozen=True)
class HospitalData:
    """A hospital's validated training and held-out sets, ready for DP-SGD."""

    train: Dataset[Any]
    test: Dataset[Any]
    num_features: int | tuple[int, ...]
    labels: tuple[int, ...]  # empty for a regression task
    summary: str  # e.g. "455 training / 114 held-out records, 30 features, labels {0: 170, 1: 285}"


def load_task_data(task: Task, spec: DataSpec) -> HospitalData:
    """The hospital's declared data as ``task`` reads it, validated.

    A task with its own ``site_data`` turns the spec into data sets itself
    (images stored as rows, say); the records are then checked like an entry
    point's. Otherwise the generic reader applies, with real-valued targets
    for a regression task and class indices otherwise.
    """
    regression = not task.is_classification
    if task.site_data is None:
        return load_hospital_data(spec, regression=regression)
    try:
        result = task.site_data(spec)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"task {task.name!r} could not read the data spec {spec.base_dir}: "
            f"{type(exc).__name__}: {exc}; check the data against the task's documentation"
        ) from exc
    return _from_datasets(spec, f"task {task.name!r}", result, regression=regression)


def load_hospital_data(spec: DataSpec, *, regression: bool = False) -> HospitalData:
    """Read and validate the data ``spec`` declares; refuse with a :class:`DataError`.

    Without a ``test`` file, a stratified ``holdout`` fraction of the training
    file (seeded by ``spec.seed``) is held out, so evaluation sees every class
    and the split is the same on every restart. ``regression``: targets are
    real numbers (no label set), and the held-out part is a plain random one.
    """
    if not regression and not spec.labels:
        raise DataError(
            "the data spec declares no labels, and this task is a classification: set "
            f"labels = [0, 1, ...] (the class indices) in the data spec (see {_README})"
        )
    if spec.format == "entrypoint":
        train, test, num_features, y_train = _load_entrypoint(spec, regression=regression)
        n_test = len(cast(Any, test))
    else:
        if spec.train is None or spec.label is None:
            raise DataError("data spec has no train file or label column; see " + _README)
        x, y = _read_table(spec, spec.train, regression=regression)
        if spec.test is not None:
            x_test, y_test = _read_table(spec, spec.test, regression=regression)
            train_idx = np.arange(len(y))
        else:
            strata = np.zeros(len(y), dtype=np.int64) if regression else y
            train_idx, test_idx = _stratified_split(strata, spec.holdout, spec.seed)
            x_test, y_test = x[test_idx], y[test_idx]
            if len(train_idx) < spec.min_records:
                raise DataError(
                    f"{spec.train.name}: {len(y)} records, of which {len(test_idx)} are held out "
                    f"for evaluation, leaves {len(train_idx)} for training, fewer than "
                    f"min_records = {spec.min_records}; add records, provide a separate test "
                    "file, or lower holdout"
                )
        y_train = y[train_idx]
        train = _tensors(spec, x[train_idx], y_train, regression=regression)
        test = _tensors(spec, x_test, y_test, regression=regression)
        num_features, n_test = len(spec.features), len(y_test)
    where = spec.train.name if spec.train else str(spec.entry_point)
    if len(y_train) < spec.min_records:
        raise DataError(
            f"{where}: {len(y_train)} training records, fewer than min_records = "
            f"{spec.min_records}; too few records give DP-SGD almost no signal under its noise. "
            "Add records, or lower min_records in the data spec if the consortium agrees"
        )
    if n_test == 0:
        raise DataError(
            f"{where}: the held-out test set is empty; provide test records (or a larger "
            "holdout) so the hospital can evaluate the global model"
        )
    feats = num_features if isinstance(num_features, int) else "x".join(map(str, num_features))
    if regression:
        summary = (
            f"{len(y_train)} training / {n_test} held-out records, {feats} features, "
            f"targets in [{float(np.min(y_train)):.4g}, {float(np.max(y_train)):.4g}]"
        )
        return HospitalData(train, test, num_features, (), summary)
    counts = {lab: int(np.count_nonzero(y_train == lab)) for lab in spec.labels}
    absent = [lab for lab, c in counts.items() if c == 0]
    if absent and not spec.allow_missing_labels:
        raise DataError(
            f"{where}: declared labels {absent} never occur in the training records "
            f"(counts {counts}); an update trained without them pulls the consortium's model "
            "towards the classes present. Add records of those classes, or set "
            "allow_missing_labels = true in the data spec if the consortium accepts it"
        )
    summary = (
        f"{len(y_train)} training / {n_test} held-out records, {feats} features, labels {counts}"
    )
    return HospitalData(train, test, num_features, spec.labels, summary)


def _from_datasets(spec: DataSpec, source: str, result: Any, *, regression: bool) -> HospitalData:
    """Validate data sets a task built itself from the spec, like an entry point's."""
    if not regression and not spec.labels:
        raise DataError(
            f"the data spec declares no labels, and {source} is a classification: set "
            f"labels = [0, 1, ...] in the data spec (see {_README})"
        )
    train, test, num_features, y_train = _checked_datasets(
        spec, source, result, regression=regression
    )
    n_test = len(cast(Any, test))
    if len(y_train) < spec.min_records or n_test == 0:
        raise DataError(
            f"{source}: {len(y_train)} training and {n_test} held-out records; it needs at "
            f"least min_records = {spec.min_records} to train on and one to evaluate on"
        )
    feats = num_features if isinstance(num_features, int) else "x".join(map(str, num_features))
    summary = f"{len(y_train)} training / {n_test} held-out records, {feats} features"
    return HospitalData(train, test, num_features, () if regression else spec.labels, summary)


def validate_against_model(data: HospitalData, model: nn.Module) -> None:
    """One forward pass of a 2-record batch, so a shape mismatch is caught before round 1.

    Also checks that the model has a logit for every declared label, since
    cross-entropy with a label index past the last logit fails only mid-training.
    """
    n = min(2, len(cast(Any, data.train)))
    items = [data.train[i] for i in range(n)]
    batch = torch.stack([torch.as_tensor(item[0]) for item in items])
    param = next(model.parameters(), None)
    if param is not None:
        batch = batch.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(batch)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = next((m for m in model.modules() if list(m.parameters(recurse=False))), None)
        if (
            isinstance(first, nn.Linear)
            and batch.dim() == 2
            and first.in_features != batch.shape[1]
        ):
            reason = f"model expects {first.in_features} features, data has {batch.shape[1]}"
        else:
            reason = f"data of shape {tuple(batch.shape[1:])} ({batch.dtype}) fails: {exc}"
        raise DataError(
            f"the data does not fit the consortium's model: {reason}; check features "
            "(and their order) in the data spec against the model the consortium agreed on"
        ) from exc
    finally:
        model.train(was_training)
    if not data.labels:  # regression: one prediction per record
        if not isinstance(out, torch.Tensor) or out.shape[0] != n or out.numel() != n:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(
                f"model returned {shape} for a batch of {n}; a regression model returns one "
                "value per record, (batch, 1) or (batch,)"
            )
        return
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"model returned {shape} for a batch of {n}; expected (batch, logits)")
    if max(data.labels) >= out.shape[1]:
        raise DataError(
            f"model has {out.shape[1]} logits but the data spec declares labels "
            f"{list(data.labels)}; labels are logit indices, so each must be below "
            f"{out.shape[1]}: fix labels in the data spec"
        )


def write_csv_partition(
    path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    feature_names: Sequence[str],
    label: str = "label",
) -> None:
    """Write one hospital's records as a CSV with a header row (the demo's layout).

    Floats are written with ``repr`` (shortest round-trip form), so reading the
    file back gives the same float64 values.
    """
    x, y = np.asarray(features, dtype=np.float64), np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or x.shape[1] != len(feature_names):
        raise DataError(
            f"cannot write {path}: features {x.shape}, labels {y.shape} and "
            f"{len(feature_names)} feature names do not line up as (n, f), (n,) and f"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*feature_names, label])
        integer = np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)
        for row, lab in zip(x.tolist(), y.tolist(), strict=True):
            # Class indices as integers; a regression's targets as exact floats.
            writer.writerow([*map(repr, row), int(lab) if integer else repr(float(lab))])


def write_spec(path: Path, **fields: object) -> Path:
    """Write a data spec TOML file from ``fields`` and return its path.

    The text is checked with :meth:`DataSpec.from_mapping` before it is
    written, so a bad spec fails here rather than on the hospital's box.
    """
    text = "".join(f"{key} = {_toml_value(key, value)}\n" for key, value in fields.items())
    DataSpec.from_mapping(tomllib.loads(text), base_dir=path.parent, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- internals -----------------------------------------------------------------------------


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 'inf' and 'nan' are TOML too
    if isinstance(value, str | Path):
        text = value.as_posix() if isinstance(value, Path) else value
        return '"' + "".join(_toml_char(c) for c in text) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    raise DataError(f"write_spec: {key} = {value!r} is not a str, int, float, bool or list")


def _toml_char(c: str) -> str:
    if c.isprintable() and c not in '"\\':
        return c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def _read_table(
    spec: DataSpec, path: Path, *, regression: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Declared columns of ``path`` as float64 features and int64 labels.

    Features are ``(n, f)``; labels are float64 targets for ``regression``.
    """
    if not path.is_file():
        raise DataError(f"data file {path} (named in the data spec) not found; fix the path")
    label = cast(str, spec.label)
    columns = [*spec.features, label]
    if spec.format == "csv":
        found, raw, where = _csv_columns(path, columns)
    else:
        found, raw, where = _parquet_columns(path, columns)
    missing = [c for c in columns if c not in found]
    if missing:
        hint = ""
        if len(found) == 1 and any(sep in found[0] for sep in ";\t"):
            hint = " (the file looks ';' or tab separated: save it comma separated)"
        elif found and all(_is_number(c) for c in found):
            hint = " (the first line looks like data: add a header row)"
        raise DataError(
            f"{path.name}: declared columns {missing} not found{hint}; the file has columns "
            f"{found}. Fix features/label in the data spec or rename the columns"
        )
    values = np.column_stack([_numeric(path, c, raw[c], where, c == label) for c in columns])
    bad = ~np.isfinite(values)
    if bad.any():
        parts = [
            f"{c!r}: {int(bad[:, j].sum())} (first at {where(int(np.argmax(bad[:, j])))})"
            for j, c in enumerate(columns)
            if bad[:, j].any()
        ]
        raise DataError(
            f"{path.name}: {int(bad.sum())} missing or non-finite values ({'; '.join(parts)}); "
            "impute or drop those records before joining (fedvault does not impute)"
        )
    y = values[:, -1]
    if regression:
        return values[:, :-1], y
    fractional = np.flatnonzero(y != np.round(y))
    if fractional.size:
        i = int(fractional[0])
        raise DataError(
            f"{path.name}: label column {label!r} has non-integer value {float(y[i]):g} at "
            f"{where(i)}; labels must be class indices from the declared label set"
        )
    y_int = y.astype(np.int64)
    outside = np.flatnonzero(~np.isin(y_int, spec.labels))
    if outside.size:
        rows = ", ".join(where(int(i)) for i in outside[:_SHOW])
        more = f" and {outside.size - _SHOW} more" if outside.size > _SHOW else ""
        raise DataError(
            f"{path.name}: label column {label!r} has values {sorted(set(y_int[outside].tolist()))}"
            f" outside the declared labels {list(spec.labels)} (at {rows}{more}); correct those "
            "records or declare the labels in the data spec"
        )
    return values[:, :-1], y_int


def _csv_columns(
    path: Path, columns: Sequence[str]
) -> tuple[list[str], dict[str, list[Any]], Callable[[int], str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            rows: list[list[str]] = []
            lines: list[int] = []
            for row in reader:
                if not row:
                    continue  # blank line
                if len(row) != len(header):
                    raise DataError(
                        f"{path.name}: line {reader.line_num} has {len(row)} fields, the header "
                        f"has {len(header)}; fix that record (a stray comma or quote?)"
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path.name} cannot be read as UTF-8 CSV ({exc}); re-export it") from exc
    if not header:
        raise DataError(f"{path.name} is empty; it needs a header row and one row per record")
    dupes = sorted({c for c in columns if header.count(c) > 1})
    if dupes:
        raise DataError(f"{path.name}: columns {dupes} appear more than once in the header")
    raw = {c: [r[header.index(c)] for r in rows] for c in columns if c in header}
    return header, raw, lambda i: f"line {lines[i]}"


def _parquet_columns(
    path: Path, columns: Sequence[str]
) -> tuple[list[str], dict[str, Any], Callable[[int], str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        found = list(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in columns if c in found])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path.name} cannot be read as Parquet ({exc}); re-export it") from exc
    raw: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        kind = col.type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            raw[name] = col.cast(pa.float64()).to_numpy()  # nulls become NaN
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            raw[name] = col.to_pylist()
        else:
            raise DataError(
                f"{path.name}: column {name!r} has type {kind}; store it as a number "
                "(integer or float) in the Parquet file"
            )
    return found, raw, lambda i: f"row {i}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _numeric(
    path: Path, column: str, raw: Any, where: Callable[[int], str], is_label: bool
) -> np.ndarray:
    """Parse one column; missing markers become NaN, anything else non-numeric is refused."""
    if isinstance(raw, np.ndarray):
        return raw.astype(np.float64)
    out = np.empty(len(raw), dtype=np.float64)
    bad: list[int] = []
    for i, cell in enumerate(raw):
        text = "" if cell is None else str(cell).strip()
        if text.lower() in _MISSING:
            out[i] = math.nan
            continue
        try:
            out[i] = float(text)
        except ValueError:
            bad.append(i)
    if bad:
        hint = " (map class names to integer labels)" if is_label else ""
        raise DataError(
            f"{path.name}: column {column!r} has non-numeric value {raw[bad[0]]!r} at "
            f"{where(bad[0])} ({len(bad)} such values in that column); store numbers only{hint}"
        )
    return out


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n_c)`` of each class, keeping at least one in train."""
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for lab in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == lab))
        take = min(math.floor(fraction * len(idx) + 0.5), len(idx) - 1)
        test.append(idx[:take])
    test_idx = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    return np.setdiff1d(np.arange(len(y)), test_idx), test_idx


def _tensors(
    spec: DataSpec, x: np.ndarray, y: np.ndarray, *, regression: bool = False
) -> TensorDataset:
    features = torch.as_tensor(x, dtype=_DTYPES[spec.dtype])
    if not torch.isfinite(features).all():
        raise DataError(
            f"some feature values overflow {spec.dtype}; rescale them or set dtype = 'float64'"
        )
    targets = torch.as_tensor(y, dtype=torch.float32 if regression else torch.int64)
    return TensorDataset(features, targets)


def _load_entrypoint(
    spec: DataSpec, *, regression: bool = False
) -> tuple[Dataset[Any], Dataset[Any], int | tuple[int, ...], np.ndarray]:
    entry = cast(str, spec.entry_point)
    module_name, _, func_name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises on import
        raise DataError(
            f"entry_point {entry!r}: cannot import {module_name!r} ({exc}); install that "
            "package in the daemon's environment or add its directory to PYTHONPATH"
        ) from exc
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        what = "does not exist" if func is None else f"is a {type(func).__name__}, not callable"
        raise DataError(f"entry_point {entry!r}: {module_name}.{func_name} {what}; fix the name")
    try:
        result = func(spec.base_dir)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"entry_point {entry!r} raised {type(exc).__name__}: {exc}; fix the loader "
            "(it is called with the data spec's directory)"
        ) from exc
    return _checked_datasets(spec, f"entry_point {entry!r}", result, regression=regression)


def _checked_datasets(
    spec: DataSpec, entry: str, result: Any, *, regression: bool
) -> tuple[Dataset[Any], Dataset[Any], int | tuple[int, ...], np.ndarray]:
    """Check a loader's ``(train, test)`` item by item (``entry`` names the loader)."""
    if not (
        isinstance(result, tuple)
        and len(result) == 2
        and all(hasattr(d, "__len__") and hasattr(d, "__getitem__") for d in result)
    ):
        raise DataError(
            f"{entry} returned {type(result).__name__}; it must return a tuple "
            "(train Dataset, test Dataset) of (features tensor, int64 label) pairs"
        )
    shapes: list[tuple[int, ...]] = []
    y_train = np.array([])
    for part, dataset in zip(("train", "test"), result, strict=True):
        y = np.empty(len(dataset), dtype=np.float64 if regression else np.int64)
        for i in range(len(dataset)):
            y[i] = _check_item(spec, entry, part, i, dataset[i], shapes, regression=regression)
        outside = np.flatnonzero(~np.isin(y, spec.labels)) if not regression else np.array([])
        if outside.size:
            raise DataError(
                f"{entry}: {part} labels {sorted(set(y[outside].tolist()))} are "
                f"outside the declared labels {list(spec.labels)} (items "
                f"{outside[:_SHOW].tolist()}); fix the data or the labels in the data spec"
            )
        if part == "train":
            y_train = y
    shape = shapes[0] if shapes else ()
    return result[0], result[1], shape[0] if len(shape) == 1 else shape, y_train


def _check_item(
    spec: DataSpec,
    entry: str,
    part: str,
    i: int,
    item: Any,
    shapes: list[tuple[int, ...]],
    *,
    regression: bool = False,
) -> float:
    """Check one ``(features, target)`` item of a loader's data set; return the target."""
    where = f"{entry}: {part} item {i}"
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(f"{where} is {type(item).__name__}; items must be (features, label)")
    x, lab = item
    if not isinstance(x, torch.Tensor) or x.dtype != _DTYPES[spec.dtype]:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(
            f"{where}: features are {got}, the data spec declares a {spec.dtype} tensor; "
            f"convert with torch.as_tensor(..., dtype=torch.{spec.dtype}) or change dtype"
        )
    if shapes and tuple(x.shape) != shapes[0]:
        raise DataError(f"{where}: features shape {tuple(x.shape)}, earlier items {shapes[0]}")
    if not shapes:
        shapes.append(tuple(x.shape))
    if not torch.isfinite(x).all():
        raise DataError(f"{where}: features contain NaN or infinite values; clean them first")
    if regression:
        value = lab.item() if isinstance(lab, torch.Tensor) and lab.numel() == 1 else lab
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise DataError(f"{where}: target {lab!r} is not a number")
        if not math.isfinite(float(value)):
            raise DataError(f"{where}: target {value!r} is not finite; clean it first")
        return float(value)
    if isinstance(lab, torch.Tensor) and lab.numel() == 1 and not lab.is_floating_point():
        lab = lab.item()
    if isinstance(lab, np.integer):
        lab = int(lab)
    if isinstance(lab, bool) or not isinstance(lab, int):
        raise DataError(f"{where}: label {lab!r} is not an integer class index")
    return lab
