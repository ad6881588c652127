"""Take a global model home: pick a version, decrypt it, write it with a model card.

Every committed global model is a version ``(job, round)``. In an ``he`` job only a
hospital, which archived each global model (:mod:`fedvault.client.archive`) and holds
the HE key, can turn one into weights; the coordinator holds only ciphertext it cannot
decrypt, by design, so it exports plaintext jobs only. An export directory holds
``model.safetensors``, ``model-card.json`` (provenance, metrics, privacy) and
``MODEL_CARD.md``, renamed into place whole, so a crash never leaves a half export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from fedvault.client.archive import ModelArchive, fsync_dir
from fedvault.metrics import greater_is_better
from fedvault.privacy.errors import InvalidConfigError, KeyMismatchError

__all__ = [
    "ModelVersion",
    "build_card",
    "export_from_hospital",
    "export_from_store",
    "list_versions_hospital",
    "list_versions_store",
    "load_export",
    "select_round",
    "weights_digest",
    "write_export",
]

WEIGHTS_FILE = "model.safetensors"
CARD_JSON = "model-card.json"
CARD_MD = "MODEL_CARD.md"
_DP_KEYS = ("noise_multiplier", "sample_rate", "steps", "accountant")
_PRIVACY_HEAD = ("ε at job end", "δ at job end", "noise multiplier", "sample rate", "steps")
Summary = Mapping[str, Any] | None


@dataclass(frozen=True)
class ModelVersion:
    """A model version held: its round and the consortium's metrics of that model."""

    round: int
    metrics: Mapping[str, float] = field(default_factory=dict)


def _mapping(value: Any) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else empty: a relayed summary is read defensively."""
    return value if isinstance(value, Mapping) else {}


def round_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """The finite pooled metrics of one ``summary["rounds"]`` entry, with its ``accuracy``
    and ``loss`` (all an older report has) unless ``metrics`` names them too."""
    raw = {k: entry.get(k) for k in ("accuracy", "loss")} | dict(_mapping(entry.get("metrics")))
    return {
        str(k): float(v)
        for k, v in raw.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _metrics_by_round(summary: Summary) -> dict[int, dict[str, float]]:
    rounds = [_mapping(r) for r in (summary or {}).get("rounds") or []]
    return {r["round"]: round_metrics(r) for r in rounds if isinstance(r.get("round"), int)}


def select_round(available: Sequence[int], summary: Summary, selector: str, *, metric: str) -> int:
    """The round ``selector`` names among the versions ``available``.

    ``"latest"``: the highest round held (0, the untrained initial model, only when
    nothing else is). ``"best"``: the round whose pooled ``metric`` is best (per
    :func:`fedvault.metrics.greater_is_better`; on a tie the later round, which saw more
    data for the same score). ``"N"``: round N. :class:`InvalidConfigError` when nothing
    is held, N is not, or no round held has ``metric`` (naming the metrics that exist).
    """
    held = sorted(set(available))
    if not held:
        raise InvalidConfigError("no model version is held for this job; export after a round")
    text = str(selector).strip()
    if text == "latest":
        return held[-1]
    if text == "best":
        by_round = _metrics_by_round(summary)
        scored = [(by_round[r][metric], r) for r in held if metric in by_round.get(r, {})]
        if not scored:
            known = ", ".join(sorted({m for r in held for m in by_round.get(r, {})}))
            raise InvalidConfigError(
                f"no model version held has metric {metric!r}, so there is no 'best' by it; "
                f"metrics recorded: {known or 'none (no evaluated round yet)'}. "
                "Pick a round number or 'latest'"
            )
        sign = 1.0 if greater_is_better(metric) else -1.0
        return max(scored, key=lambda s: (sign * s[0], s[1]))[1]
    if text.isdigit():
        if int(text) in held:
            return int(text)
        shown = ", ".join(map(str, held))
        raise InvalidConfigError(f"the job has no model version {text}; versions held: {shown}")
    raise InvalidConfigError(
        f"model version {selector!r} is unknown: pass 'latest', 'best' or a round number"
    )


# -- the model card ------------------------------------------------------------------


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the tensors, whatever file holds them (a safetensors header is not
    byte-stable): per tensor in name order, ``[name, dtype, shape]`` as compact JSON, a
    NUL, then its C-order little-endian bytes."""
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
    """Each hospital's (ε, δ) at ``server_round`` (``None``: no ledger entry by then) and
    at the job's end, with the DP-SGD parameters that re-derive them."""
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
    job_config: Mapping[str, Any],
    task_fingerprint: Mapping[str, Any] | None,
    server_round: int,
    selector: str,
    summary: Summary,
    consortium: str,
    exported_by: str,
    weights_sha256: str,
) -> dict[str, Any]:
    """The JSON model card: a model that leaves the consortium carries what it is (task,
    job, round and why), how good it is (pooled metrics per round) and what it cost in
    privacy (each hospital's ε, δ and DP parameters then and at the job's end)."""
    summary = summary or {}
    metric = str(job_config.get("best_metric") or "loss")
    by_round = _metrics_by_round(summary)
    final, task = _mapping(summary.get("final")), _mapping(summary.get("task"))
    fingerprint = task_fingerprint or _mapping(task.get("fingerprint"))
    best, higher = selector == "best", greater_is_better(metric)
    how = f"the round with the {'highest' if higher else 'lowest'} pooled {metric}"
    how = how if best else "the last round held" if selector == "latest" else "by number"
    each = _mapping(_round_entry(summary, server_round).get("hospital_metrics"))
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


def _card_markdown(card: Mapping[str, Any]) -> str:
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
        "",
        "## Privacy per hospital",
        "",
        _row(["hospital", f"ε at round {rnd}", f"δ at round {rnd}", *_PRIVACY_HEAD, "accountant"]),
        "|---" * 9 + "|",
    ]
    for name, p in hospitals.items():
        ends = [p["at_round"]["epsilon"], p["at_round"]["delta"], *p["at_job_end"].values()]
        lines.append(_row([name, *ends, *(p[k] for k in _DP_KEYS)]))
    rows = card["metrics_per_round"]
    names = sorted({m for r in rows for m in r["metrics"]})
    lines += ["", "## Metrics per round (consortium, pooled)", ""]
    lines += [_row(["round", *names]), "|---" * (len(names) + 1) + "|"]
    for r in rows:
        mark = " (exported)" if r["round"] == rnd else ""
        lines.append(_row([f"{r['round']}{mark}", *(r["metrics"].get(m) for m in names)]))
    return "\n".join(lines) + "\n"


# -- writing and reading an export ------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidConfigError(
            f"export directory {out} already exists and is not empty; pass a new --out "
            "directory (an export never overwrites files)"
        )


def write_export(out: Path, *, weights: Mapping[str, np.ndarray], card: Mapping[str, Any]) -> Path:
    """Write the export directory ``out`` (missing or empty, else InvalidConfigError).

    ``card["weights_sha256"]`` must be :func:`weights_digest` of ``weights``: a card never
    describes other weights than the ones beside it. The card written adds ``files``.
    """
    out = Path(out)
    _check_out(out)
    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    if card.get("weights_sha256") != weights_digest(tensors):
        raise InvalidConfigError(
            "the model card's weights_sha256 is not the digest of these weights; build the "
            "card with weights_sha256=weights_digest(weights)"
        )
    job, rnd = str(card.get("job")), str(card.get("round"))
    meta = {"format": "pt", "fedvault_job": job, "fedvault_round": rnd}
    blob = safetensors.numpy.save(tensors, metadata=meta)
    full = {**card, "files": {WEIGHTS_FILE: {"sha256": hashlib.sha256(blob).hexdigest()}}}
    text = json.dumps(full, indent=2, allow_nan=False) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        markdown = _card_markdown(full)
        for name, data in ((WEIGHTS_FILE, blob), (CARD_JSON, text), (CARD_MD, markdown)):
            with open(tmp / name, "xb") as fh:
                fh.write(data if isinstance(data, bytes) else data.encode("utf-8"))
                fh.flush()
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        try:
            os.replace(tmp, out)  # onto a missing or empty directory: all files at once
        except OSError as exc:
            raise InvalidConfigError(
                f"cannot move the export into {out} ({exc.strerror}); pass a new --out directory"
            ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    fsync_dir(out.parent)
    return out


def load_export(out: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The weights and model card of an export, checked against each other."""
    out = Path(out)
    missing = [f for f in (WEIGHTS_FILE, CARD_JSON, CARD_MD) if not (out / f).is_file()]
    if missing:
        raise InvalidConfigError(
            f"{out} is not a fedvault model export (missing {', '.join(missing)}); "
            "pass the directory `fedvault model export --out` wrote"
        )
    weights = safetensors.numpy.load_file(str(out / WEIGHTS_FILE))
    card = json.loads((out / CARD_JSON).read_text(encoding="utf-8"))
    if weights_digest(weights) != card.get("weights_sha256"):
        raise InvalidConfigError(
            f"{out / WEIGHTS_FILE} does not match the SHA-256 in its model card: the export "
            "was modified or damaged; export the version again"
        )
    return weights, card


# -- exporting ----------------------------------------------------------------------------


def _export(
    out: Path,
    selector: str,
    load: Callable[[int], dict[str, np.ndarray]],
    held: Sequence[int],
    summary: Summary,
    config: Mapping[str, Any],
    fingerprint: Mapping[str, Any] | None,
    exported_by: str,
    consortium: str,
) -> Path:
    """Select; check ``out`` before the (slow) decryption; load; write with a card."""
    metric = str(config.get("best_metric") or "loss")
    number = select_round(held, summary, selector, metric=metric)
    _check_out(Path(out))
    weights = load(number)
    card = build_card(
        job_config=config,
        task_fingerprint=fingerprint,
        server_round=number,
        selector=selector,
        summary=summary,
        consortium=consortium,
        exported_by=exported_by,
        weights_sha256=weights_digest(weights),
    )
    return write_export(Path(out), weights=weights, card=card)


def export_from_hospital(
    *, state_dir: Path, job: str, selector: str, out: Path, kit_dir: Path | None = None
) -> Path:
    """Export a version of ``job`` from a hospital's archive, decrypting it if needed.

    ``kit_dir`` names the consortium and hospital on the card; ``"best"`` uses the job's
    ``best_metric`` (default ``loss``). :class:`KeyMismatchError` when this state
    directory holds no HE key that opens the version.
    """
    state_dir = Path(state_dir)
    archive = ModelArchive(state_dir)
    config_text, fingerprint_text = archive.job_info(job)
    consortium, party = "", "hospital"
    if kit_dir is not None:
        from fedvault.kit import Kit, KitKind

        kit = Kit.load(kit_dir, expected_kind=KitKind.HOSPITAL)
        consortium, party = kit.consortium, kit.party

    def load(number: int) -> dict[str, np.ndarray]:
        payload = archive.model(job, number)
        if payload.envelope is None:
            return dict(payload.arrays or {})
        return _decrypt(state_dir, payload.envelope, job, number)

    config = json.loads(config_text)
    fingerprint = json.loads(fingerprint_text) if fingerprint_text else None
    held, summary = archive.versions(job), archive.summary(job)
    return _export(out, selector, load, held, summary, config, fingerprint, party, consortium)


def _decrypt(state_dir: Path, envelope: bytes, job: str, number: int) -> dict[str, np.ndarray]:
    # Imported here: listing versions and plaintext exports need no TenSEAL.
    from fedvault.client.keys import KeyStore
    from fedvault.privacy.he import decrypt_average, parse_envelope

    keys = KeyStore(state_dir)
    try:
        ctx = keys.find(parse_envelope(envelope).context_fingerprint)
    except KeyMismatchError as exc:
        raise KeyMismatchError(
            f"cannot decrypt version {number} of job {job!r}: {exc}. Export must run with the "
            "--state of a hospital that holds the consortium's HE key (this state directory "
            f"{state_dir} holds key epochs {keys.epochs() or 'none'})"
        ) from exc
    return decrypt_average(ctx, envelope)


def export_from_store(
    *, store_url: str, job: str, selector: str, out: Path, at_rest_key: bytes | None = None
) -> Path:
    """Export a version of a plaintext job from the coordinator's round store (an ``he``
    job: :class:`InvalidConfigError`, only hospitals can decrypt it)."""
    from fedvault.coordinator.report import build_report
    from fedvault.coordinator.store import RoundStore
    from fedvault.npz import arrays_from_bytes

    with RoundStore(store_url, at_rest_key=at_rest_key) as store:
        record = _store_job(store, job)
        if str(record.config.get("secure_aggregation", "he")) != "none":
            raise InvalidConfigError(
                f"job {job} ran in he mode: the coordinator holds only ciphertext it cannot "
                "decrypt (by design); export at a hospital: fedvault model export --kit "
                f"HOSPITAL_KIT --state HOSPITAL_STATE --job {job}"
            )

        def load(number: int) -> dict[str, np.ndarray]:
            blob = store.model(record.id, number)
            if blob is None or blob.kind != "plain":
                raise InvalidConfigError(
                    f"version {number} of job {job} is not a plaintext model in this store; "
                    "export it at a hospital"
                )
            return arrays_from_bytes(blob.blob)

        summary = build_report(store, job)
        consortium = str(summary.get("consortium") or "")
        held, by = store.model_rounds(record.id), "coordinator"
        return _export(out, selector, load, held, summary, record.config, None, by, consortium)


def _store_job(store: Any, job: str) -> Any:
    record = store.get_job(job)
    if record is None:
        held = ", ".join(_store_jobs(store)) or "none"
        raise InvalidConfigError(f"no job {job!r} in the round store; jobs held: {held}")
    return record


def _store_jobs(store: Any) -> list[str]:
    """Every job's name: read-only tooling on the store's engine (RoundStore lists none)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from fedvault.coordinator.store_models import JobTable

    with Session(store.engine) as s:
        return list(s.scalars(select(JobTable.name).order_by(JobTable.name)))


# -- listing ----------------------------------------------------------------------------------


def _versions(rounds: Sequence[int], summary: Summary) -> list[ModelVersion]:
    by_round = _metrics_by_round(summary)
    return [ModelVersion(r, by_round.get(r, {})) for r in sorted(rounds)]


def list_versions_hospital(
    state_dir: Path, job: str | None = None
) -> dict[str, list[ModelVersion]]:
    """The versions a hospital holds, by job (one job when ``job`` is given)."""
    archive = ModelArchive(Path(state_dir))
    names = archive.jobs() if job is None else [job]
    return {name: _versions(archive.versions(name), archive.summary(name)) for name in names}


def list_versions_store(
    store_url: str, job: str | None = None, at_rest_key: bytes | None = None
) -> dict[str, list[ModelVersion]]:
    """The versions the coordinator's store holds, by job (ciphertext ones included)."""
    from fedvault.coordinator.report import build_report
    from fedvault.coordinator.store import RoundStore

    with RoundStore(store_url, at_rest_key=at_rest_key) as store:
        names = _store_jobs(store) if job is None else [job]
        jobs = {name: _store_job(store, name).id for name in names}
        return {
            n: _versions(store.model_rounds(i), build_report(store, n)) for n, i in jobs.items()
        }
