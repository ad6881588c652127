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
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from fedvault.app.model_card import (
    CARD_JSON,
    CARD_MD,
    WEIGHTS_FILE,
    Summary,
    build_card,
    card_markdown,
    metrics_by_round,
    weights_digest,
)
from fedvault.client.archive import ModelArchive
from fedvault.durable import atomic_write, replace_dir
from fedvault.errors import InvalidConfigError, KeyMismatchError
from fedvault.json_types import JSONObject, JSONValue
from fedvault.metrics import greater_is_better

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


@dataclass(frozen=True)
class ModelVersion:
    """A model version held: its round and the consortium's metrics of that model."""

    round: int
    metrics: Mapping[str, float] = field(default_factory=dict)


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
        by_round = metrics_by_round(summary)
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


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidConfigError(
            f"export directory {out} already exists and is not empty; pass a new --out "
            "directory (an export never overwrites files)"
        )


def write_export(
    out: Path, *, weights: Mapping[str, np.ndarray], card: Mapping[str, JSONValue]
) -> Path:
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
        markdown = card_markdown(full)
        for name, data in ((WEIGHTS_FILE, blob), (CARD_JSON, text), (CARD_MD, markdown)):
            atomic_write(tmp / name, data, 0o644, overwrite=False)
        try:
            # onto a missing or empty directory: all files at once, then the parent fsynced
            replace_dir(tmp, out)
        except OSError as exc:
            raise InvalidConfigError(
                f"cannot move the export into {out} ({exc.strerror}); pass a new --out directory"
            ) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return out


def load_export(out: Path) -> tuple[dict[str, np.ndarray], JSONObject]:
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
    fingerprint = _fingerprint(fingerprint_text)
    held, summary = archive.versions(job), archive.summary(job)
    return _export(out, selector, load, held, summary, config, fingerprint, party, consortium)


def _fingerprint(text: str) -> dict[str, Any] | None:
    """The archived task fingerprint as the card shows it, with its digest.

    The digest is what site policies pin; ``None`` when the coordinator sent none.
    """
    if not text:
        return None
    from fedvault.errors import MalformedUpdateError
    from fedvault.fingerprint import TaskFingerprint

    try:
        digest = TaskFingerprint.from_json(text).digest
    except MalformedUpdateError:
        return dict(json.loads(text))  # shown as received; the hospital refused no such job
    return {**json.loads(text), "digest": digest}


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
    """Export a version of a plaintext job from the coordinator's round store.

    An ``he`` job raises :class:`InvalidConfigError`: only hospitals can decrypt it.
    """
    from fedvault.config import SecureAggregation
    from fedvault.coordinator.report import build_report
    from fedvault.coordinator.store import RoundStore
    from fedvault.npz import arrays_from_bytes

    with RoundStore(store_url, at_rest_key=at_rest_key) as store:
        record = _store_job(store, job)
        if SecureAggregation.parse(str(record.config.get("secure_aggregation", "he"))).encrypted:
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

        summary = build_report(store, job).to_json()
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
    by_round = metrics_by_round(summary)
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
            n: _versions(store.model_rounds(i), build_report(store, n).to_json())
            for n, i in jobs.items()
        }
