"""The model card that travels with an exported model: provenance, metrics, privacy.

A card says what a model is (the task, its fingerprint, the round), how well it
did (the consortium's pooled metrics per round, each hospital's own), and what
it cost in privacy (each hospital's ε and δ with the DP parameters that
re-derive them). ``model-card.json`` holds it for machines; ``MODEL_CARD.md``
for the people who decide whether to use the model.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import numpy as np

from fedvault.json_types import JSONObject, JSONValue
from fedvault.metrics import greater_is_better

__all__ = [
    "CARD_JSON",
    "CARD_MD",
    "WEIGHTS_FILE",
    "Summary",
    "build_card",
    "card_markdown",
    "metrics_by_round",
    "round_metrics",
    "weights_digest",
]

WEIGHTS_FILE = "model.safetensors"
CARD_JSON = "model-card.json"
CARD_MD = "MODEL_CARD.md"
_DP_KEYS = ("noise_multiplier", "sample_rate", "steps", "accountant")
_PRIVACY_HEAD = ("ε at job end", "δ at job end", "noise multiplier", "sample rate", "steps")
Summary = Mapping[str, Any] | None


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else empty: a relayed summary is read defensively."""
    return value if isinstance(value, Mapping) else {}


def round_metrics(entry: Mapping[str, object]) -> dict[str, float]:
    """The finite pooled metrics of one ``summary["rounds"]`` entry.

    With its ``accuracy`` and ``loss`` (all an older report has) unless ``metrics``
    names them too.
    """
    raw = {k: entry.get(k) for k in ("accuracy", "loss")} | dict(_mapping(entry.get("metrics")))
    return {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def metrics_by_round(summary: Summary) -> dict[int, dict[str, float]]:
    """Each round of the summary's ``rounds`` -> its metrics (see :func:`round_metrics`)."""
    rounds = [_mapping(r) for r in (summary or {}).get("rounds") or []]
    return {r["round"]: round_metrics(r) for r in rounds if isinstance(r.get("round"), int)}


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the tensors, whatever file holds them.

    A safetensors header is not byte-stable, so the digest is over, per tensor in
    name order, ``[name, dtype, shape]`` as compact JSON, a NUL, then its C-order
    little-endian bytes.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        a = np.asarray(weights[name])
        a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
        head = json.dumps([name, a.dtype.str, list(a.shape)], separators=(",", ":"))
        h.update(head.encode("utf-8") + b"\0" + a.tobytes())
    return h.hexdigest()


def _version() -> str:
    try:
        return metadata.version("fedvault")
    except metadata.PackageNotFoundError:
        return "unknown"


def _round_entry(summary: Mapping[str, Any], server_round: int) -> Mapping[str, Any]:
    rounds = [_mapping(r) for r in summary.get("rounds") or []]
    return next((r for r in rounds if r.get("round") == server_round), {})


def _privacy(summary: Mapping[str, Any], server_round: int) -> dict[str, dict[str, Any]]:
    """Each hospital's (ε, δ) at ``server_round`` and at the job's end.

    With the DP-SGD parameters that re-derive them; ε is ``None`` at ``server_round``
    when the hospital had no ledger entry by then.
    """
    now = _round_entry(summary, server_round)
    out: dict[str, dict[str, Any]] = {}
    for name, raw in sorted(_mapping(summary.get("hospitals")).items()):
        info = _mapping(raw)
        eps = _mapping(now.get("epsilon")).get(name)
        delta = _mapping(now.get("delta")).get(name, info.get("delta"))
        if server_round == 0:  # the initial model saw no hospital's data
            eps, delta = 0.0, 0.0
        out[name] = {
            "at_round": {"epsilon": eps, "delta": None if eps is None else delta},
            "at_job_end": {"epsilon": info.get("epsilon"), "delta": info.get("delta")},
            **{k: info.get(k) for k in (*_DP_KEYS, "samples")},
        }
    return out


def build_card(
    *,
    job_config: Mapping[str, JSONValue],
    task_fingerprint: Mapping[str, JSONValue] | None,
    server_round: int,
    selector: str,
    summary: Summary,
    consortium: str,
    exported_by: str,
    weights_sha256: str,
) -> JSONObject:
    """The JSON model card.

    A model that leaves the consortium carries what it is (task, job, round and
    why), how good it is (pooled metrics per round) and what it cost in privacy
    (each hospital's ε, δ and DP parameters then and at the job's end).
    """
    summary = summary or {}
    metric = str(job_config.get("best_metric") or "loss")
    by_round = metrics_by_round(summary)
    final, task = _mapping(summary.get("final")), _mapping(summary.get("task"))
    fingerprint = task_fingerprint or _mapping(task.get("fingerprint"))
    best, higher = selector == "best", greater_is_better(metric)
    how = f"the round with the {'highest' if higher else 'lowest'} pooled {metric}"
    how = how if best else "the last round held" if selector == "latest" else "by number"
    now = _round_entry(summary, server_round)
    each = _mapping(now.get("hospital_metrics"))
    hospitals = {str(h): round_metrics({"metrics": m}) for h, m in sorted(each.items())}
    return {
        "card_version": 1,
        "job": job_config.get("job"),
        "consortium": consortium or summary.get("consortium") or None,
        "task": {"name": job_config.get("task"), "fingerprint": dict(fingerprint or {}) or None},
        "secure_aggregation": job_config.get("secure_aggregation"),
        "round": server_round,
        "selection": {"selector": selector, "metric": metric if best else None, "how": how},
        "rounds_completed": final.get("rounds_completed", len(by_round) or None),
        "job_status": final.get("status"),
        "metrics": {"consortium": by_round.get(server_round, {}), "hospitals": hospitals},
        "metrics_per_round": [{"round": r, "metrics": m} for r, m in sorted(by_round.items())],
        "privacy": {
            "target": dict(_mapping(job_config.get("privacy"))) or None,
            "hospitals": _privacy(summary, server_round),
            "epsilon_max": {
                "at_round": 0.0 if server_round == 0 else now.get("epsilon_max"),
                "at_job_end": final.get("epsilon_max"),
            },
            # a large consortium's summary lists only the largest ε (report.summarise)
            "hospitals_not_listed": summary.get("hospitals_not_listed") or 0,
        },
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "exported_by": exported_by,
        "fedvault_version": _version(),
        "weights_sha256": weights_sha256,
    }


def _num(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(_num(c) for c in cells) + " |"


def _base_model_lines(task: Mapping[str, Any]) -> list[str]:
    """For a task that shares only adapters: what the weights are not, and how to get it."""
    fingerprint = _mapping(task.get("fingerprint"))
    frozen = fingerprint.get("frozen_sha256")
    if not frozen:
        return []
    return [
        "- Weights hold only the trained parameters (adapters and head): the frozen "
        f"pretrained base is not included. Rebuild it with task {task.get('name')!r}'s "
        f"build_model() (distribution {fingerprint.get('distribution') or '—'} "
        f"{fingerprint.get('version') or ''}); its weights' SHA-256 must be {frozen}, then "
        "load these with model.load_state_dict(weights, strict=False)",
    ]


def card_markdown(card: Mapping[str, JSONValue]) -> str:
    """The model card (see :func:`build_card`) as Markdown, for people."""
    return _markdown(card)


def _markdown(card: Mapping[str, Any]) -> str:
    """:func:`card_markdown`, reading the card's nested JSON as :func:`build_card` shapes it."""
    task, rnd, now = card["task"], card["round"], card["metrics"]["consortium"]
    digest = _mapping(task.get("fingerprint")).get("digest")
    target = _mapping(card["privacy"]["target"])
    hospitals: Mapping[str, Any] = card["privacy"]["hospitals"]
    lines = [
        f"# Model card: {card['job']}, round {rnd}",
        "",
        f"- Task: {task.get('name')}" + (f" (fingerprint {digest})" if digest else ""),
        f"- Consortium: {card['consortium'] or '—'}",
        f"- Secure aggregation: {_num(card['secure_aggregation'])}",
        f"- Round exported: {rnd} of {_num(card['rounds_completed'])} committed (job "
        f"{card['job_status'] or 'status unknown'}); selected {card['selection']['selector']}: "
        f"{card['selection']['how']}",
        "- Metrics of this round (consortium, pooled): "
        + (", ".join(f"{k} {_num(v)}" for k, v in sorted(now.items())) or "not evaluated"),
        f"- Privacy target per hospital: ε = {_num(target.get('epsilon'))}, "
        f"δ = {_num(target.get('delta'))} (accountant {target.get('accountant', '—')})",
        f"- Exported {card['exported_at']} by {card['exported_by']} "
        f"with fedvault {card['fedvault_version']}",
        f"- Weights SHA-256 (tensors): {card['weights_sha256']}",
        f"- Files: {WEIGHTS_FILE} (safetensors.torch.load_file), {CARD_JSON} (this card as JSON)",
        *_base_model_lines(task),
        "",
        "## Privacy per hospital",
        "",
        _row(["hospital", f"ε at round {rnd}", f"δ at round {rnd}", *_PRIVACY_HEAD, "accountant"]),
        "|---" * 9 + "|",
    ]
    for name, p in hospitals.items():
        ends = [p["at_round"]["epsilon"], p["at_round"]["delta"], *p["at_job_end"].values()]
        lines.append(_row([name, *ends, *(p[k] for k in _DP_KEYS)]))
    worst, unlisted = (
        _mapping(card["privacy"].get("epsilon_max")),
        card["privacy"].get("hospitals_not_listed"),
    )
    if unlisted:
        lines += [
            "",
            f"{unlisted} hospitals are not listed (for a consortium this large the "
            "coordinator relays only the largest ε; its report.json lists each): the largest ε was "
            f"{_num(worst.get('at_round'))} at round {rnd} and {_num(worst.get('at_job_end'))} "
            "at the job's end.",
        ]
    rows = card["metrics_per_round"]
    names = sorted({m for r in rows for m in r["metrics"]})
    lines += ["", "## Metrics per round (consortium, pooled)", ""]
    lines += [_row(["round", *names]), "|---" * (len(names) + 1) + "|"]
    for r in rows:
        mark = " (exported)" if r["round"] == rnd else ""
        lines.append(_row([f"{r['round']}{mark}", *(r["metrics"].get(m) for m in names)]))
    return "\n".join(lines) + "\n"


# -- writing and reading an export ------------------------------------------------------
