"""Evaluation metrics at one hospital, and correctly pooled across the consortium.

Each hospital evaluates the global model on its held-out data and reports an
:class:`EvalResult`: its own metric values and *sufficient statistics*
(confusion matrix, score histograms, regression sums) that :func:`pool` sums,
because most metrics do not average: a sample-weighted mean of per-hospital
AUROCs (or F1s, or RMSEs) is not the value on the union of their test sets.
scikit-learn computes every value, on a hospital's records or on the pooled
statistics expanded back into weighted records, so both share one definition.
An undefined metric (AUROC with one class present) is absent, never NaN, so
results are strict JSON. numpy and scikit-learn only: the coordinator has no torch.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.task import MetricFn, TaskKind

__all__ = [
    "HIST_BINS_BINARY",
    "HIST_BINS_MULTICLASS",
    "MAX_CLASSES",
    "POOLING_NOTES",
    "TASK_METRIC_POOLING",
    "EvalResult",
    "evaluate_scores",
    "greater_is_better",
    "metric_names",
    "pool",
]

#: Bins of P(class 1) on [0, 1] for the binary AUROC: the pooled AUROC is exact for
#: scores rounded to them (~1e-3 from the raw scores'), for 2 x 1000 integers a hospital.
HIST_BINS_BINARY = 1000
#: Bins per class (one-vs-rest) for the macro AUROC: coarser, as the wire carries K x 2 x bins.
HIST_BINS_MULTICLASS = 100
#: The most classes a result from the wire may describe: bounds what parsing allocates.
MAX_CLASSES = 1000

_MAX_COUNT = 2**31 - 1
_ACC = ("accuracy", "balanced_accuracy")
_NAMES: Mapping[str, tuple[str, ...]] = {
    "binary": (*_ACC, "auroc", "f1", "sensitivity", "specificity", "loss"),
    "multiclass": (*_ACC, "auroc_macro", "f1_macro", "loss"),
    "regression": ("mae", "rmse", "r2", "loss"),
}
_LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
# what a well-behaved hospital can report; anything outside is a bug or a lie
_BOUNDS: Mapping[str, tuple[float, float]] = {
    **dict.fromkeys(set(_NAMES["binary"] + _NAMES["multiclass"]) - {"loss"}, (0.0, 1.0)),
    **{"mae": (0.0, math.inf), "rmse": (0.0, math.inf), "r2": (-math.inf, 1.0)},
}
_REGRESSION_STATS = ("n", "sae", "sse", "sum_y", "sum_y2")

#: How :func:`pool` combines each built-in metric, one line each, for docs and reports.
POOLING_NOTES: Mapping[str, str] = {
    **dict.fromkeys(
        ("accuracy", "balanced_accuracy", "f1", "f1_macro", "sensitivity", "specificity"),
        "from the summed per-hospital confusion matrices (exact on the union)",
    ),
    "auroc": f"from summed per-hospital histograms of P(class 1), {HIST_BINS_BINARY} bins",
    "auroc_macro": "mean over classes of the one-vs-rest AUROC from summed per-hospital "
    f"histograms of P(class k), {HIST_BINS_MULTICLASS} bins",
    "mae": "summed absolute errors / summed records (exact on the union)",
    "rmse": "sqrt(summed squared errors / summed records) (exact on the union)",
    "r2": "1 - summed squared errors / total sum of squares from summed y and y² (exact)",
    "loss": "sample-weighted mean of the hospitals' mean losses (exact on the union)",
}
#: How :func:`pool` combines a task's own metrics: it has no statistics for them.
TASK_METRIC_POOLING = "sample-weighted mean over the hospitals reporting it (not the union's value)"


def metric_names(kind: TaskKind) -> tuple[str, ...]:
    """The built-in metrics of a task kind, in report order (``loss`` last)."""
    _check_kind(kind)
    return _NAMES[kind]


def greater_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (task-own metrics: yes)."""
    return name not in _LOWER_IS_BETTER


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    """One hospital's evaluation of a model on its held-out data.

    ``samples`` (>= 1) records were evaluated, with mean ``loss``; ``metrics``
    are this hospital's own values (``"loss"`` included; undefined ones absent,
    never NaN); ``stats`` are the JSON-safe sufficient statistics :func:`pool`
    sums: ``{"confusion", "hist"}`` for classification, ``{"n", "sum_y",
    "sum_y2", "sse", "sae"}`` for regression.
    """

    samples: int
    loss: float
    metrics: Mapping[str, float]
    stats: Mapping[str, Any]

    def __post_init__(self) -> None:
        if not _is_int(self.samples) or not 1 <= self.samples <= _MAX_COUNT:
            raise InvalidConfigError(f"EvalResult.samples must be in 1..{_MAX_COUNT}")
        bad = {k: v for k, v in {"loss": self.loss, **self.metrics}.items() if not _finite(v)}
        if bad:  # an undefined metric is left out, so that results stay strict JSON
            raise InvalidConfigError(f"EvalResult loss and metrics must be finite numbers: {bad}")
        # plain dicts: json.dumps(result.metrics) works, and callers cannot alias ours
        object.__setattr__(self, "loss", float(self.loss))
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})
        object.__setattr__(self, "stats", dict(self.stats))

    def to_json(self) -> str:
        """Compact strict JSON (no NaN or infinity), keys sorted, for the wire."""
        return json.dumps(vars(self), separators=(",", ":"), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(
        cls,
        text: str | bytes,
        *,
        kind: TaskKind,
        num_classes: int,
        extra_metrics: Collection[str] = (),
    ) -> EvalResult:
        """Parse and fully validate what a hospital sent.

        A hospital may be buggy or hostile, and its statistics feed published
        numbers, so every field is checked against the task (kind,
        ``num_classes`` = ``task.num_classes``, built-in and ``extra_metrics``
        names, value ranges) and against the other fields (totals must agree).
        Raises :class:`MalformedUpdateError` naming the first bad field, or
        :class:`InvalidConfigError` if the caller's ``kind``/``num_classes`` is bad.
        """
        k = _check_classes(kind, num_classes)
        try:
            body = json.loads(text, object_pairs_hook=_no_duplicates)
        except (ValueError, TypeError, RecursionError) as exc:
            raise MalformedUpdateError(f"evaluation result is not valid JSON: {exc}") from exc
        _check_keys(body, {"loss", "metrics", "samples", "stats"}, "evaluation result")
        samples = body["samples"]
        if not _is_int(samples) or not 1 <= samples <= _MAX_COUNT:
            raise MalformedUpdateError(f"field 'samples' must be an integer in 1..{_MAX_COUNT}")
        loss = _number(body["loss"], "loss")
        metrics = _parse_metrics(body["metrics"], kind, loss, extra_metrics)
        if kind == "regression":
            _check_regression_stats(body["stats"], samples)
        else:
            _check_classification_stats(body["stats"], kind, k, samples)
        return cls(samples=samples, loss=loss, metrics=metrics, stats=body["stats"])


def evaluate_scores(
    kind: TaskKind,
    targets: np.ndarray,
    scores: np.ndarray,
    *,
    loss: float,
    num_classes: int = 0,
    extra: Mapping[str, MetricFn] = {},
) -> EvalResult:
    """Evaluate one hospital's held-out predictions.

    Parameters
    ----------
    targets, scores
        ``(n,)`` class indices and ``(n, num_classes)`` class probabilities
        (rows sum to 1; the predicted class is the argmax, a tie going to the
        lower class), or ``(n,)`` real targets and predictions for regression.
    loss
        Mean loss over the ``n`` records.
    num_classes
        Classes of a classification task (``0`` means 2 for ``binary``).
    extra
        The task's own metrics, ``name -> (targets, scores) -> value``; a
        non-finite value is left out (undefined here); an exception propagates.

    Raises
    ------
    InvalidConfigError
        No records, bad shapes, labels or probabilities, a non-finite loss, or
        an ``extra`` name that shadows a built-in metric.
    """
    k = _check_classes(kind, num_classes)
    y, s = np.asarray(targets), np.asarray(scores)
    n = len(y) if y.ndim == 1 else -1
    if not 1 <= n <= _MAX_COUNT:  # a hospital without held-out data has nothing to report
        raise InvalidConfigError(f"targets must be 1-D with 1..{_MAX_COUNT} records, not {y.shape}")
    if not _finite(loss):
        raise InvalidConfigError(f"loss must be a finite number, got {loss!r}")
    clash = set(extra) & set(_NAMES[kind])
    if clash:
        raise InvalidConfigError(f"task metrics {sorted(clash)} shadow built-in ones; rename them")
    from sklearn import config_context

    # The inputs were checked above (shapes, finiteness, labels, probabilities), so
    # scikit-learn's own per-call validation is skipped: on a simulated hospital's few
    # records it cost more than the metrics themselves.
    with config_context(skip_parameter_validation=True, assume_finite=True):
        if kind == "regression":
            metrics, stats = _regression_eval(y, s)
        else:
            metrics, stats = _classification_eval(kind, y, s, k)
    metrics["loss"] = float(loss)
    for name, fn in extra.items():
        value = float(fn(y, s))
        if math.isfinite(value):
            metrics[name] = value
    return EvalResult(samples=n, loss=float(loss), metrics=metrics, stats=stats)


def pool(
    kind: TaskKind, results: Sequence[EvalResult], *, num_classes: int = 0
) -> dict[str, float]:
    """Consortium-wide metric values from the hospitals' results (``{}`` for none).

    Confusion-based and regression metrics are exactly the union's values; an
    AUROC is exact for the union's scores rounded to the histogram bins;
    ``loss`` is the sample-weighted mean (exact); a task's own metric is a
    sample-weighted mean over the hospitals reporting it (:data:`POOLING_NOTES`).
    Metrics undefined on the union are absent.
    """
    k = _check_classes(kind, num_classes)
    if not results:
        return {}
    out: dict[str, float]
    if kind == "regression":
        n, sae, sse, sum_y, sum_y2 = (
            math.fsum(float(_stat(r, key)) for r in results) for key in _REGRESSION_STATS
        )
        out = {"mae": sae / n, "rmse": math.sqrt(sse / n)}
        sst = sum_y2 - sum_y**2 / n
        if sst > 0:  # constant targets: R² is 0/0
            out["r2"] = 1.0 - sse / sst
    else:
        confusion = sum(_stat(r, "confusion", (k, k)) for r in results)
        shape = (2, HIST_BINS_BINARY) if kind == "binary" else (k, 2, HIST_BINS_MULTICLASS)
        hist = sum(_stat(r, "hist", shape) for r in results)
        # the summed confusion matrix as weighted (true, predicted) records: the same
        # scikit-learn calls as at a hospital then give exactly the union's values
        true, pred = np.divmod(np.arange(k * k), k)
        weight = np.asarray(confusion, dtype=np.float64).ravel()
        keep = weight > 0
        out = _label_metrics(kind, true[keep], pred[keep], k, weight[keep])
        aucs = [_hist_auroc(h) for h in ([hist] if kind == "binary" else hist)]
        if None not in aucs:  # a class without positives or negatives: undefined
            auc = math.fsum(aucs) / len(aucs)  # type: ignore[arg-type]
            out["auroc" if kind == "binary" else "auroc_macro"] = auc
    out["loss"] = math.fsum(r.samples * r.loss for r in results) / sum(r.samples for r in results)
    for name in sorted({m for r in results for m in r.metrics} - set(_NAMES[kind])):
        pairs = [(r.samples, r.metrics[name]) for r in results if name in r.metrics]
        out[name] = math.fsum(w * v for w, v in pairs) / sum(w for w, _ in pairs)
    return out


# -- computation --------------------------------------------------------------------
def _classification_eval(
    kind: str, y: np.ndarray, s: np.ndarray, k: int
) -> tuple[dict[str, float], dict[str, Any]]:
    from sklearn import metrics as skm

    if s.shape != (len(y), k):
        raise InvalidConfigError(f"scores must have shape ({len(y)}, {k}), got {s.shape}")
    if y.dtype.kind not in "biuf" or not np.isfinite(y).all():
        raise InvalidConfigError("targets must be class indices (finite numbers)")
    labels = y.astype(np.int64)
    if (labels != y).any() or labels.min() < 0 or labels.max() >= k:
        raise InvalidConfigError(f"targets must be class indices in 0..{k - 1}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all() or s.min() < -1e-6 or s.max() > 1 + 1e-6:
        raise InvalidConfigError("scores must be class probabilities in [0, 1]; apply softmax")
    s, y = np.clip(s, 0.0, 1.0), labels
    row = s.sum(axis=1)
    if np.abs(row - 1).max() > 1e-3:
        raise InvalidConfigError("each row of scores must sum to 1; apply softmax to the logits")
    if not np.allclose(1, row):  # float32 softmax: renormalise to what scikit-learn accepts
        s = s / row[:, None]
    pred = np.argmax(s, axis=1)
    metrics = _label_metrics(kind, y, pred, k, None)
    if (np.bincount(y, minlength=k) > 0).all():  # AUROC needs every class present
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "binary":
                metrics["auroc"] = float(skm.roc_auc_score(y, s[:, 1]))
            else:
                auc = skm.roc_auc_score(y, s, multi_class="ovr", average="macro", labels=range(k))
                metrics["auroc_macro"] = float(auc)
    if kind == "binary":
        hist: Any = _histogram(s[:, 1], y == 1, HIST_BINS_BINARY)
    else:
        hist = [_histogram(s[:, c], y == c, HIST_BINS_MULTICLASS) for c in range(k)]
    confusion = skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    return metrics, {"confusion": confusion, "hist": hist}


def _histogram(prob: np.ndarray, positive: np.ndarray, bins: int) -> list[list[int]]:
    """Counts of ``prob`` in equal bins on [0, 1] (1.0 in the last): negatives, positives."""
    index = np.minimum((prob * bins).astype(np.int64), bins - 1)
    return [np.bincount(index[positive == side], minlength=bins).tolist() for side in (False, True)]


def _label_metrics(
    kind: str, y: np.ndarray, pred: np.ndarray, k: int, weight: np.ndarray | None
) -> dict[str, float]:
    """Confusion-based metrics: of one hospital's records, or of pooled weighted cells."""
    from sklearn import metrics as skm

    w, kw = np.ones(len(y)) if weight is None else weight, {"sample_weight": weight}
    with warnings.catch_warnings():
        # a class absent from the data makes sklearn warn; we leave such metrics out instead
        warnings.simplefilter("ignore")
        out = {"accuracy": float(skm.accuracy_score(y, pred, **kw))}
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y, pred, **kw))
        if kind != "binary":
            f1 = skm.f1_score(y, pred, labels=range(k), average="macro", zero_division=0, **kw)
            return {**out, "f1_macro": float(f1)}
        if w[(y == 1) | (pred == 1)].sum() > 0:  # F1 is 0/0 with no positive anywhere
            out["f1"] = float(skm.f1_score(y, pred, pos_label=1, **kw))
        recall = skm.recall_score(y, pred, labels=[0, 1], average=None, zero_division=0, **kw)
    for name, label in (("specificity", 0), ("sensitivity", 1)):
        if w[y == label].sum() > 0:  # the recall of a class without records is 0/0
            out[name] = float(recall[label])
    return out


def _hist_auroc(hist: np.ndarray) -> float | None:
    """Exact AUROC of scores at the bin centres weighted by the counts; None if one-sided."""
    from sklearn.metrics import roc_auc_score

    if hist[0].sum() == 0 or hist[1].sum() == 0:
        return None
    bins = hist.shape[1]
    label, score = np.repeat([0, 1], bins), np.tile((np.arange(bins) + 0.5) / bins, 2)
    weight = hist.ravel().astype(np.float64)
    keep = weight > 0
    return float(roc_auc_score(label[keep], score[keep], sample_weight=weight[keep]))


def _regression_eval(y: np.ndarray, s: np.ndarray) -> tuple[dict[str, float], dict[str, Any]]:
    from sklearn import metrics as skm

    s = s[:, 0] if s.ndim == 2 and s.shape[1] == 1 else s
    if s.shape != y.shape:
        raise InvalidConfigError(f"predictions must have shape {y.shape}, got {s.shape}")
    y, s = y.astype(np.float64), s.astype(np.float64)
    if not (np.isfinite(y).all() and np.isfinite(s).all()):
        raise InvalidConfigError("regression targets and predictions must be finite")
    metrics = {"mae": float(skm.mean_absolute_error(y, s))}
    metrics["rmse"] = float(skm.root_mean_squared_error(y, s))
    if np.ptp(y) > 0:  # R² of constant targets is 0/0
        metrics["r2"] = float(skm.r2_score(y, s))
    err = y - s
    stats = {"n": len(y), "sum_y": math.fsum(y), "sum_y2": math.fsum(y * y)}
    stats |= {"sse": math.fsum(err * err), "sae": math.fsum(np.abs(err))}
    return metrics, stats


# -- the caller's input (InvalidConfigError) -----------------------------------------
def _check_kind(kind: object) -> None:
    if kind not in _NAMES:
        raise InvalidConfigError(f"task kind {kind!r} is not one of {get_args(TaskKind)}")


def _check_classes(kind: TaskKind, num_classes: int) -> int:
    """The number of classes (0 for regression); rejects a bad value from the caller."""
    _check_kind(kind)
    if not _is_int(num_classes):
        raise InvalidConfigError(f"num_classes must be an integer, got {num_classes!r}")
    if kind == "regression":
        return 0
    ok = num_classes in (0, 2) if kind == "binary" else 2 <= num_classes <= MAX_CLASSES
    if not ok:
        raise InvalidConfigError(
            f"num_classes={num_classes} does not fit a {kind} task (binary: 2, multiclass: "
            f"2..{MAX_CLASSES}); pass task.num_classes"
        )
    return 2 if kind == "binary" else int(num_classes)


def _stat(result: EvalResult, key: str, shape: tuple[int, ...] = ()) -> Any:
    """One statistic of a result to pool; an int64 array of ``shape`` unless ``()``."""
    value = result.stats.get(key) if isinstance(result, EvalResult) else None
    if shape and value is not None:
        value = np.asarray(value, dtype=np.int64)
    if value is None or (shape and value.shape != shape):
        raise InvalidConfigError(
            f"pool() got {result!r:.60} without statistic {key!r} of shape {shape}; "
            "pool the results of one task, with that task's kind and num_classes"
        )
    return value


# -- a hospital's input (MalformedUpdateError) ---------------------------------------
def _is_int(v: object) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _finite(v: object) -> bool:
    if isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond the float range
        return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # json.loads would keep the last one silently
        raise ValueError(f"an object repeats a key among {sorted(out)[:10]}")
    return out


def _check_keys(obj: Any, expected: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise MalformedUpdateError(f"{where} must be a JSON object, got {obj!r:.60}")
    missing, unknown = sorted(expected - obj.keys()), sorted(obj.keys() - expected)
    if missing or unknown:
        wrong = f"lacks keys {missing}" if missing else f"has unknown keys {unknown}"
        raise MalformedUpdateError(f"{where} {wrong}; expected exactly {sorted(expected)}")


def _number(v: Any, where: str) -> float:
    if not _finite(v):
        raise MalformedUpdateError(f"field {where!r} must be a finite number, got {v!r:.60}")
    return float(v)


def _parse_metrics(obj: Any, kind: str, loss: float, extra: Collection[str]) -> dict[str, float]:
    if not isinstance(obj, dict):
        raise MalformedUpdateError(f"field 'metrics' must be a JSON object, got {obj!r:.60}")
    allowed = set(_NAMES[kind]) | set(extra)
    unknown = sorted(obj.keys() - allowed)
    if unknown:
        raise MalformedUpdateError(
            f"field 'metrics' has unknown metrics {unknown}; this {kind} task reports "
            f"only {sorted(allowed)}"
        )
    out = {name: _number(v, f"metrics.{name}") for name, v in obj.items()}
    if out.get("loss") != loss:
        raise MalformedUpdateError("field 'metrics.loss' must be present and equal 'loss'")
    for name, v in out.items():
        lo, hi = _BOUNDS.get(name, (-math.inf, math.inf))
        if not lo <= v <= hi:
            raise MalformedUpdateError(f"field 'metrics.{name}' = {v} is outside [{lo}, {hi}]")
    return out


def _counts(v: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Nested lists of counts (integers in 0..2**31-1) of exactly ``shape``."""
    try:
        a = np.array(v, dtype=object)
    except ValueError:  # ragged in a way numpy cannot even hold
        a = np.empty(0, dtype=object)
    if a.shape != shape:
        raise MalformedUpdateError(
            f"field {where!r} must be nested lists of shape {shape}, got {v!r:.60}"
        )
    for i, x in enumerate(a.flat):
        if type(x) is not int or not 0 <= x <= _MAX_COUNT:  # JSON integers are exactly int
            at = "".join(f"[{j}]" for j in np.unravel_index(i, shape))
            raise MalformedUpdateError(
                f"field '{where}{at}' must be a count (integer in 0..{_MAX_COUNT}), got {x!r:.60}"
            )
    return a.astype(np.int64)


def _check_classification_stats(stats: Any, kind: str, k: int, samples: int) -> None:
    _check_keys(stats, {"confusion", "hist"}, "field 'stats'")
    confusion = _counts(stats["confusion"], (k, k), "stats.confusion")
    if (total := confusion.sum()) != samples:
        raise MalformedUpdateError(f"field 'stats.confusion' totals {total}, not samples={samples}")
    rows = confusion.sum(axis=1)
    if kind == "binary":  # negatives = true class 0, positives = true class 1
        got = _counts(stats["hist"], (2, HIST_BINS_BINARY), "stats.hist").sum(axis=-1)[None]
        want = rows[None]
    else:  # one-vs-rest per class: negatives = the other classes, positives = this one
        got = _counts(stats["hist"], (k, 2, HIST_BINS_MULTICLASS), "stats.hist").sum(axis=-1)
        want = np.stack([samples - rows, rows], axis=1)
    bad = np.argwhere(got != want)
    if len(bad):
        c, side = bad[0]
        at = f"[{side}]" if kind == "binary" else f"[{c}][{side}]"
        raise MalformedUpdateError(
            f"field 'stats.hist{at}' totals {got[c, side]} records, but the confusion "
            f"matrix implies {want[c, side]}"
        )


def _check_regression_stats(stats: Any, samples: int) -> None:
    _check_keys(stats, set(_REGRESSION_STATS), "field 'stats'")
    if not _is_int(stats["n"]) or stats["n"] != samples:
        raise MalformedUpdateError(f"field 'stats.n' must equal 'samples' = {samples}")
    for key in ("sum_y", "sum_y2", "sse", "sae"):
        if _number(stats[key], f"stats.{key}") < 0 and key != "sum_y":
            raise MalformedUpdateError(f"field 'stats.{key}' is a sum of squares or |errors|: < 0")
