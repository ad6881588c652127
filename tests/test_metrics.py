"""Tests for fedvault.metrics: per-hospital values, exact pooling, and the wire format."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sklearn import metrics as skm

from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.metrics import (
    HIST_BINS_BINARY,
    HIST_BINS_MULTICLASS,
    MAX_CLASSES,
    POOLING_NOTES,
    EvalResult,
    evaluate_scores,
    greater_is_better,
    metric_names,
    pool,
)

# Pooled AUROCs are exact for scores rounded to the histogram bins; against the raw
# scores they are off by at most the share of tied (same-bin) pairs, in practice far less.
AUROC_TOL_BINARY = 2e-3
AUROC_TOL_MACRO = 5e-3
EXACT = 1e-12


def _probs(rng: np.random.Generator, y: np.ndarray, k: int, signal: float) -> np.ndarray:
    """Softmax of noisy logits that favour the true class by ``signal``."""
    logits = rng.normal(size=(len(y), k))
    logits[np.arange(len(y)), y] += signal
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _hospitals(kind: str, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Three hospitals of different sizes, class balance and model quality."""
    rng = np.random.default_rng(seed)
    out = []
    for n, skew, signal in ((400, 0.0, 1.5), (900, 1.0, 0.8), (250, 2.0, 2.5)):
        if kind == "regression":
            y = rng.normal(loc=3.0 + skew, scale=1.0 + skew, size=n)
            out.append((y, y + rng.normal(scale=signal, size=n)))
            continue
        p = np.exp(-skew * np.arange(k) / k)
        y = rng.choice(k, size=n, p=p / p.sum())
        out.append((y, _probs(rng, y, k, signal)))
    return out


def _evaluate(kind: str, data: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[EvalResult]:
    return [
        evaluate_scores(kind, y, s, loss=0.1 * (i + 1), num_classes=k)  # type: ignore[arg-type]
        for i, (y, s) in enumerate(data)
    ]


def _quantised(p: np.ndarray, bins: int) -> np.ndarray:
    """Scores moved to their bin's centre: the documented binning rule (1.0 in the last bin)."""
    return (np.minimum(np.floor(p * bins), bins - 1) + 0.5) / bins


def test_names_directions_and_notes() -> None:
    assert metric_names("binary") == (
        "accuracy",
        "balanced_accuracy",
        "auroc",
        "f1",
        "sensitivity",
        "specificity",
        "loss",
    )
    assert metric_names("multiclass") == (
        "accuracy",
        "balanced_accuracy",
        "auroc_macro",
        "f1_macro",
        "loss",
    )
    assert metric_names("regression") == ("mae", "rmse", "r2", "loss")
    assert [greater_is_better(m) for m in ("loss", "mae", "rmse")] == [False] * 3
    assert all(greater_is_better(m) for m in ("auroc", "r2", "f1_macro", "my_task_metric"))
    every = {m for kind in ("binary", "multiclass", "regression") for m in metric_names(kind)}
    assert every == set(POOLING_NOTES)
    with pytest.raises(InvalidConfigError, match="kind"):
        metric_names("ranking")  # type: ignore[arg-type]


# -- one hospital: exactly scikit-learn -------------------------------------------


def test_binary_hospital_equals_sklearn() -> None:
    y, s = _hospitals("binary", 2)[0]
    r = evaluate_scores("binary", y, s, loss=0.25)
    pred = s.argmax(axis=1)
    assert r.samples == len(y) and r.loss == 0.25
    assert r.metrics == {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "auroc": skm.roc_auc_score(y, s[:, 1]),
        "f1": skm.f1_score(y, pred),
        "sensitivity": skm.recall_score(y, pred, pos_label=1),
        "specificity": skm.recall_score(y, pred, pos_label=0),
        "loss": 0.25,
    }
    assert r.stats["confusion"] == skm.confusion_matrix(y, pred).tolist()
    hist = np.asarray(r.stats["hist"])
    assert hist.shape == (2, HIST_BINS_BINARY)
    assert hist.sum(axis=1).tolist() == [int((y == 0).sum()), int((y == 1).sum())]


def test_multiclass_hospital_equals_sklearn() -> None:
    k = 4
    y, s = _hospitals("multiclass", k)[1]
    r = evaluate_scores("multiclass", y, s, loss=1.5, num_classes=k)
    pred = s.argmax(axis=1)
    assert r.metrics == {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "auroc_macro": skm.roc_auc_score(y, s, multi_class="ovr", average="macro"),
        "f1_macro": skm.f1_score(y, pred, average="macro", labels=range(k), zero_division=0),
        "loss": 1.5,
    }
    assert r.stats["confusion"] == skm.confusion_matrix(y, pred, labels=range(k)).tolist()
    hist = np.asarray(r.stats["hist"])
    assert hist.shape == (k, 2, HIST_BINS_MULTICLASS)
    positives = np.bincount(y, minlength=k)
    assert (hist[:, 1].sum(axis=1) == positives).all()
    assert (hist[:, 0].sum(axis=1) == len(y) - positives).all()


def test_regression_hospital_equals_sklearn() -> None:
    y, s = _hospitals("regression", 0)[2]
    r = evaluate_scores("regression", y, s, loss=0.5)
    assert r.metrics == {
        "mae": skm.mean_absolute_error(y, s),
        "rmse": math.sqrt(skm.mean_squared_error(y, s)),
        "r2": skm.r2_score(y, s),
        "loss": 0.5,
    }
    assert r.stats["n"] == len(y)
    assert r.stats["sse"] == pytest.approx(((y - s) ** 2).sum(), rel=EXACT)


def test_histogram_edges() -> None:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.0, 0.4999, 0.5001, 1.0])
    r = evaluate_scores("binary", y, np.stack([1 - p1, p1], axis=1), loss=0.0)
    neg, pos = np.asarray(r.stats["hist"])
    assert neg[0] == 1 and neg[499] == 1 and neg.sum() == 2
    assert pos[500] == 1 and pos[HIST_BINS_BINARY - 1] == 1 and pos.sum() == 2


# -- pooling: the union's values ----------------------------------------------------


def test_pool_binary_equals_union() -> None:
    data = _hospitals("binary", 2)
    pooled = pool("binary", _evaluate("binary", data, 2))
    y = np.concatenate([d[0] for d in data])
    s = np.concatenate([d[1] for d in data])
    pred = s.argmax(axis=1)
    union = {
        "accuracy": skm.accuracy_score(y, pred),
        "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
        "f1": skm.f1_score(y, pred),
        "sensitivity": skm.recall_score(y, pred, pos_label=1),
        "specificity": skm.recall_score(y, pred, pos_label=0),
    }
    for name, value in union.items():
        assert pooled[name] == pytest.approx(value, abs=EXACT), name
    exact = skm.roc_auc_score(y, s[:, 1])
    assert abs(pooled["auroc"] - exact) < AUROC_TOL_BINARY
    assert pooled["auroc"] == skm.roc_auc_score(y, _quantised(s[:, 1], HIST_BINS_BINARY))
    sizes = [len(d[0]) for d in data]
    assert pooled["loss"] == pytest.approx(np.dot(sizes, [0.1, 0.2, 0.3]) / sum(sizes), abs=EXACT)
    assert set(pooled) == set(metric_names("binary"))


def test_pool_multiclass_equals_union() -> None:
    k = 5
    data = _hospitals("multiclass", k, seed=1)
    pooled = pool("multiclass", _evaluate("multiclass", data, k), num_classes=k)
    y = np.concatenate([d[0] for d in data])
    s = np.concatenate([d[1] for d in data])
    pred = s.argmax(axis=1)
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=EXACT)
    assert pooled["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(y, pred), abs=EXACT
    )
    f1 = skm.f1_score(y, pred, average="macro", labels=range(k), zero_division=0)
    assert pooled["f1_macro"] == pytest.approx(f1, abs=EXACT)
    exact = skm.roc_auc_score(y, s, multi_class="ovr", average="macro")
    assert abs(pooled["auroc_macro"] - exact) < AUROC_TOL_MACRO
    binned = [
        skm.roc_auc_score(y == c, _quantised(s[:, c], HIST_BINS_MULTICLASS)) for c in range(k)
    ]
    assert pooled["auroc_macro"] == math.fsum(binned) / k


def test_pool_regression_equals_union() -> None:
    data = _hospitals("regression", 0, seed=2)
    pooled = pool("regression", _evaluate("regression", data, 0))
    y = np.concatenate([d[0] for d in data])
    s = np.concatenate([d[1] for d in data])
    assert pooled["mae"] == pytest.approx(skm.mean_absolute_error(y, s), abs=EXACT)
    assert pooled["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, s)), abs=EXACT)
    assert pooled["r2"] == pytest.approx(skm.r2_score(y, s), abs=EXACT)


def test_the_trap_mean_of_aurocs_is_not_the_pooled_auroc() -> None:
    """Each hospital ranks perfectly, but on its own scale: the union ranks far worse."""
    rng = np.random.default_rng(3)
    data = []
    for lo, n in ((0.55, 300), (0.05, 700)):  # negatives in [lo, lo+0.1), positives +0.2
        y = np.repeat([0, 1], n // 2)
        p1 = lo + 0.1 * rng.random(n) + 0.2 * y
        data.append((y, np.stack([1 - p1, p1], axis=1)))
    results = _evaluate("binary", data, 2)
    assert all(r.metrics["auroc"] == 1.0 for r in results)
    weighted_mean = sum(r.samples * r.metrics["auroc"] for r in results) / 1000
    y = np.concatenate([d[0] for d in data])
    p1 = np.concatenate([d[1][:, 1] for d in data])
    union = skm.roc_auc_score(y, p1)
    pooled = pool("binary", results)["auroc"]
    assert weighted_mean - union > 0.05
    assert abs(pooled - union) < AUROC_TOL_BINARY
    assert pooled == skm.roc_auc_score(y, _quantised(p1, HIST_BINS_BINARY))


def test_pool_edge_cases() -> None:
    assert pool("binary", []) == {}
    assert pool("regression", []) == {}
    y, s = np.zeros(10, dtype=int), np.tile([0.9, 0.1], (10, 1))
    only_negatives = pool("binary", [evaluate_scores("binary", y, s, loss=0.1)])
    assert set(only_negatives) == {"accuracy", "balanced_accuracy", "specificity", "loss"}
    json.dumps(only_negatives, allow_nan=False)
    const = evaluate_scores("regression", np.ones(5), np.arange(5.0), loss=1.0)
    assert "r2" not in pool("regression", [const, const])
    with pytest.raises(InvalidConfigError, match="statistic"):
        pool("multiclass", [evaluate_scores("binary", y, s, loss=0.1)], num_classes=3)


def test_task_metrics_added_skipped_and_pooled() -> None:
    data = _hospitals("binary", 2)[:2]
    extra = {
        "positive_rate": lambda t, s: float(np.mean(s.argmax(axis=1))),
        "undefined": lambda t, s: float("nan"),
    }
    results = [
        evaluate_scores("binary", y, s, loss=0.1, extra=extra)  # type: ignore[arg-type]
        for y, s in data
    ]
    assert "undefined" not in results[0].metrics
    rates = [r.metrics["positive_rate"] for r in results]
    sizes = [r.samples for r in results]
    pooled = pool("binary", results)
    assert pooled["positive_rate"] == pytest.approx(np.dot(rates, sizes) / sum(sizes), abs=EXACT)
    with pytest.raises(InvalidConfigError, match="shadow"):
        evaluate_scores("binary", *data[0], loss=0.1, extra={"auroc": extra["positive_rate"]})


# -- undefined metrics are absent, never NaN -------------------------------------------


@pytest.mark.parametrize(
    ("kind", "k", "targets", "scores", "absent"),
    [
        ("binary", 2, [0, 0, 0], [[0.8, 0.2]] * 3, {"auroc", "f1", "sensitivity"}),
        ("binary", 2, [1, 1], [[0.3, 0.7]] * 2, {"auroc", "specificity"}),
        ("multiclass", 3, [0, 1, 1], [[0.5, 0.3, 0.2]] * 3, {"auroc_macro"}),
        ("regression", 0, [2.0, 2.0, 2.0], [1.0, 2.0, 3.0], {"r2"}),
        ("regression", 0, [2.0], [1.5], {"r2"}),
    ],
)
def test_undefined_metrics_are_absent(
    kind: Any, k: int, targets: list[Any], scores: list[Any], absent: set[str]
) -> None:
    r = evaluate_scores(kind, np.array(targets), np.array(scores), loss=0.3, num_classes=k)
    assert absent.isdisjoint(r.metrics)
    assert set(r.metrics) | absent == set(metric_names(kind))
    assert all(math.isfinite(v) for v in r.metrics.values())
    json.dumps(r.metrics, allow_nan=False)
    json.dumps(pool(kind, [r, r], num_classes=k), allow_nan=False)
    assert EvalResult.from_json(r.to_json(), kind=kind, num_classes=k) == r


# -- the wire -----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "k"), [("binary", 2), ("multiclass", 4), ("regression", 0)])
def test_json_round_trip(kind: Any, k: int) -> None:
    y, s = _hospitals(kind, k)[0]
    r = evaluate_scores(kind, y, s, loss=0.7, num_classes=k, extra={"own": lambda t, s: 0.5})
    text = r.to_json()
    assert " " not in text and text == json.dumps(
        json.loads(text), sort_keys=True, separators=(",", ":")
    )
    back = EvalResult.from_json(text, kind=kind, num_classes=k, extra_metrics={"own"})
    assert back == r
    assert back.to_json() == text
    json.dumps(back.metrics, allow_nan=False)
    with pytest.raises(MalformedUpdateError, match="own"):
        EvalResult.from_json(text, kind=kind, num_classes=k)  # not a metric of this task


def _binary_body() -> dict[str, Any]:
    y, s = _hospitals("binary", 2)[2]
    return json.loads(evaluate_scores("binary", y, s, loss=0.4).to_json())


def _mutate(path: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    """Set (or with ``value is _DEL``, delete) the item at a dotted path like ``stats.hist.1.3``."""

    def apply(body: dict[str, Any]) -> dict[str, Any]:
        *parents, last = path.split(".")
        node: Any = body
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        index = int(last) if isinstance(node, list) else last
        if value is _DEL:
            del node[index]
        elif callable(value):
            node[index] = value(node[index])
        else:
            node[index] = value
        return body

    return apply


_DEL = object()


def _move_hist_count(body: dict[str, Any]) -> dict[str, Any]:
    neg = body["stats"]["hist"][0]
    i = next(j for j, c in enumerate(neg) if c > 0)
    neg[i] -= 1
    body["stats"]["hist"][1][i] += 1
    return body


HOSTILE: list[tuple[str, Any, str]] = [
    ("nan loss", _mutate("loss", float("nan")), "'loss'"),
    ("inf metric", _mutate("metrics.accuracy", float("inf")), "metrics.accuracy"),
    ("bool as number", _mutate("metrics.f1", True), "metrics.f1"),
    ("bool samples", _mutate("samples", True), "samples"),
    ("bool count", _mutate("stats.confusion.0.0", True), r"stats\.confusion\[0\]\[0\]"),
    ("negative count", _mutate("stats.confusion.1.0", -1), r"stats\.confusion\[1\]\[0\]"),
    ("float count", _mutate("stats.hist.1.3", 1.0), r"stats\.hist\[1\]\[3\]"),
    ("string count", _mutate("stats.hist.0.7", "3"), r"stats\.hist\[0\]\[7\]"),
    ("confusion 3x3", _mutate("stats.confusion", [[0] * 3] * 3), "stats.confusion"),
    ("confusion ragged", _mutate("stats.confusion.1", [1]), "stats.confusion"),
    ("hist too short", _mutate("stats.hist.0", [0] * 999), "stats.hist"),
    ("confusion total", _mutate("stats.confusion.0.0", lambda c: c + 1), "stats.confusion"),
    ("hist vs confusion", _move_hist_count, r"stats\.hist\[0\]"),
    ("unknown metric", _mutate("metrics.precision", 0.5), "metrics.*precision"),
    ("metric out of range", _mutate("metrics.auroc", 1.5), "metrics.auroc"),
    ("metrics.loss differs", _mutate("metrics.loss", 0.3), "metrics.loss"),
    ("metrics.loss missing", _mutate("metrics.loss", _DEL), "metrics.loss"),
    ("metrics not object", _mutate("metrics", [1]), "metrics"),
    ("unknown stats key", _mutate("stats.sse", 1.0), "stats.*sse"),
    ("missing stats key", _mutate("stats.hist", _DEL), "stats.*hist"),
    ("missing key", _mutate("stats", _DEL), "stats"),
    ("unknown key", _mutate("site", "A"), "site"),
    ("huge samples", _mutate("samples", 2**40), "samples"),
    ("huge integer loss", _mutate("loss", 10**400), "'loss'"),
    ("huge integer metric", _mutate("metrics.f1", -(10**400)), "metrics.f1"),
    ("zero samples", _mutate("samples", 0), "samples"),
    ("float samples", _mutate("samples", 10.0), "samples"),
    ("huge count", _mutate("stats.confusion.0.0", 10**400), r"stats\.confusion\[0\]\[0\]"),
    ("not JSON", lambda body: "{samples: 3", "JSON"),
    ("JSON list", lambda body: "[]", "JSON object"),
    ("JSON null", lambda body: "null", "JSON object"),
    ("duplicate key", lambda body: '{"samples": 1, "samples": 2}', "repeats a key"),
    ("deep nesting", lambda body: "[" * 100_000 + "]" * 100_000, "JSON"),
]


@pytest.mark.parametrize(
    ("mutation", "field"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE]
)
def test_from_json_rejects_hostile_input(mutation: Callable[..., Any], field: str) -> None:
    body = mutation(_binary_body())
    text = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(MalformedUpdateError, match=field):
        EvalResult.from_json(text, kind="binary", num_classes=2)


REGRESSION_HOSTILE: list[tuple[str, Any, str]] = [
    ("n mismatch", _mutate("stats.n", lambda n: n + 1), "stats.n"),
    ("float n", _mutate("stats.n", lambda n: float(n)), "stats.n"),
    ("negative sse", _mutate("stats.sse", -1.0), "stats.sse"),
    ("negative sum_y2", _mutate("stats.sum_y2", -1.0), "stats.sum_y2"),
    ("nan sum_y", _mutate("stats.sum_y", float("nan")), "stats.sum_y"),
    ("inf sae", _mutate("stats.sae", float("inf")), "stats.sae"),
    ("classification stats", _mutate("stats", {"confusion": [], "hist": []}), "stats"),
    ("negative rmse", _mutate("metrics.rmse", -0.1), "metrics.rmse"),
]


@pytest.mark.parametrize(
    ("mutation", "field"),
    [h[1:] for h in REGRESSION_HOSTILE],
    ids=[h[0] for h in REGRESSION_HOSTILE],
)
def test_from_json_rejects_hostile_regression(mutation: Callable[..., Any], field: str) -> None:
    y, s = _hospitals("regression", 0)[0]
    body = mutation(json.loads(evaluate_scores("regression", y, s, loss=0.4).to_json()))
    with pytest.raises(MalformedUpdateError, match=field):
        EvalResult.from_json(json.dumps(body), kind="regression", num_classes=0)


def test_from_json_multiclass_shapes() -> None:
    k = 3
    y, s = _hospitals("multiclass", k)[0]
    good = json.loads(evaluate_scores("multiclass", y, s, loss=1.0, num_classes=k).to_json())
    EvalResult.from_json(json.dumps(good), kind="multiclass", num_classes=k)
    with pytest.raises(MalformedUpdateError, match=r"stats\.confusion"):  # a 3-class result for 4
        EvalResult.from_json(json.dumps(good), kind="multiclass", num_classes=4)
    bad = copy.deepcopy(good)
    bad["stats"]["hist"] = bad["stats"]["hist"][0]  # 2 x 100, not 3 x 2 x 100
    with pytest.raises(MalformedUpdateError, match=r"stats\.hist"):
        EvalResult.from_json(json.dumps(bad), kind="multiclass", num_classes=k)
    bad = copy.deepcopy(good)
    bad["stats"]["hist"][2][0][5] += 1  # class 2 negatives: one record too many
    with pytest.raises(MalformedUpdateError, match=r"stats\.hist\[2\]\[0\]"):
        EvalResult.from_json(json.dumps(bad), kind="multiclass", num_classes=k)


@pytest.mark.parametrize(
    ("kind", "k"),
    [("multiclass", 1), ("multiclass", MAX_CLASSES + 1), ("binary", 3), ("binary", True)],
)
def test_bad_num_classes_is_the_callers_error(kind: Any, k: Any) -> None:
    with pytest.raises(InvalidConfigError, match="num_classes"):
        EvalResult.from_json("{}", kind=kind, num_classes=k)
    with pytest.raises(InvalidConfigError, match="num_classes"):
        pool(kind, [], num_classes=k)


@pytest.mark.parametrize(
    ("kind", "targets", "scores", "message"),
    [
        ("binary", [], np.zeros((0, 2)), "1-D with"),
        ("binary", [0, 1], [[0.5, 0.5]], "shape"),
        ("binary", [0, 2], [[0.5, 0.5]] * 2, "class indices"),
        ("binary", [0, 1], [[2.0, -1.0]] * 2, "probabilities"),
        ("binary", [0, 1], [[0.2, 0.2]] * 2, "sum to 1"),
        ("binary", [0, 1], [[np.nan, 0.5]] * 2, "probabilities"),
        ("regression", [1.0, 2.0], [1.0], "shape"),
        ("regression", [1.0, np.inf], [1.0, 2.0], "finite"),
    ],
)
def test_evaluate_scores_rejects_bad_input(
    kind: Any, targets: Any, scores: Any, message: str
) -> None:
    with pytest.raises(InvalidConfigError, match=message):
        evaluate_scores(kind, np.array(targets), np.array(scores), loss=0.1)


def test_evaluate_scores_rejects_bad_loss_and_accepts_float32_softmax() -> None:
    y, s = _hospitals("binary", 2)[0]
    with pytest.raises(InvalidConfigError, match="loss"):
        evaluate_scores("binary", y, s, loss=float("nan"))
    r32 = evaluate_scores("binary", y, s.astype(np.float32), loss=0.1)
    r64 = evaluate_scores("binary", y, s, loss=0.1)
    assert r32.metrics["auroc"] == pytest.approx(r64.metrics["auroc"], abs=1e-6)


def test_module_does_not_import_torch() -> None:
    code = "import sys, fedvault.metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
