"""A hospital's own copies of the global models it received, one per round.

The coordinator keeps every committed model, but in an encrypted job it holds
only ciphertext it cannot decrypt, so a usable model can only come out of a
hospital. The hospital therefore files each global model as it arrives
(``round-00000N.he``: the envelope, still encrypted, decrypted only when a
version is exported; ``round-00000N.npz`` in a plaintext job), with the job's
configuration and task fingerprint (``job.json``) and the latest job report
the coordinator relayed (``summary.json``). Layout::

    STATE_DIR/models/JOB/job.json
    STATE_DIR/models/JOB/summary.json
    STATE_DIR/models/JOB/round-000000.he     (0: the initial model)
    STATE_DIR/models/JOB/round-000001.he ...

Every file is written durably (:func:`fedvault.durable.atomic_write`: temporary
file in the same directory, fsync, rename, fsync of the directory), so a crash
leaves either the whole file or none of it. A round received twice (a re-sent
instruction) keeps its first copy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from fedvault.durable import atomic_write, fsync_dir
from fedvault.errors import InvalidConfigError, MalformedUpdateError
from fedvault.json_types import JSONObject
from fedvault.messages import ModelPayload
from fedvault.npz import arrays_from_bytes, arrays_to_bytes

__all__ = ["ModelArchive", "check_job_name", "fsync_dir", "write_durably"]

_JOB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROUND_FILE = re.compile(r"round-(\d{6,})\.(he|npz)")
_SUFFIXES = ("he", "npz")
_JOB_INFO = "job.json"
_SUMMARY = "summary.json"


def check_job_name(job: object) -> str:
    """Return ``job`` if it is a job name, else raise :class:`InvalidConfigError`.

    Job names become directory names; anything but 1-64 letters, digits, '.',
    '_' or '-' (starting with a letter or digit) could escape the archive
    (``..``, ``/``, a trailing newline), so it is refused rather than cleaned.
    """
    if not isinstance(job, str) or not _JOB_NAME.fullmatch(job):
        shown = repr(job)[:80]
        raise InvalidConfigError(
            f"job name {shown} is not a job name: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (as the job was configured)"
        )
    return job


def _check_round(server_round: object) -> int:
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise InvalidConfigError(
            f"server round {server_round!r} must be an integer >= 0 (0 is the initial model)"
        )
    return server_round


def write_durably(path: Path, data: bytes, *, overwrite: bool = True) -> bool:
    """Write ``data`` to ``path`` all at once or not at all; return whether it was written.

    :func:`fedvault.durable.atomic_write` with mode 0600 (hospital state): a
    temporary file in the same directory, fsynced and renamed into place, then
    the directory fsynced. With ``overwrite=False`` an existing file is kept
    (even when another process wins the race to create it) and ``False`` is
    returned.
    """
    return atomic_write(path, data, 0o600, overwrite=overwrite)


class ModelArchive:
    """The global models a hospital received, by job and round.

    Parameters
    ----------
    state_dir
        The hospital's state directory (``--state``); models live under
        ``state_dir/models/JOB/``.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "models"

    # -- writing ------------------------------------------------------------------

    def _job_dir(self, job: str, *, create: bool = False) -> Path:
        path = self.root / check_job_name(job)
        if create and not path.is_dir():
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            fsync_dir(self.root)  # the new folder's name survives a crash too
        return path

    def put_model(
        self,
        job: str,
        server_round: int,
        payload: ModelPayload,
        *,
        job_config: str,
        task_fingerprint: str,
    ) -> None:
        """File the global model of ``server_round`` (kept as received: ciphertext stays so).

        ``job.json`` records ``job_config`` and ``task_fingerprint`` (JSON
        texts) with the first model; a later model of the same job under
        another configuration is refused, because a job name in one state
        directory must not mix the models of two different jobs.

        Raises
        ------
        InvalidConfigError
            The job name or round is invalid, the texts are not JSON, or the
            archive holds this job name under another configuration.
        MalformedUpdateError
            The payload holds neither an envelope nor arrays.
        """
        number = _check_round(server_round)
        config = _json_text(job_config, "job_config")
        fingerprint = _json_text(task_fingerprint, "task_fingerprint", empty_ok=True)
        if payload.envelope is not None:
            data, suffix = bytes(payload.envelope), "he"
        elif payload.arrays:
            data, suffix = arrays_to_bytes(payload.arrays), "npz"
        else:
            raise MalformedUpdateError(
                f"global model of round {number} of job {job!r} is empty; nothing to archive"
            )
        folder = self._job_dir(job, create=True)
        self._put_job_info(folder, job, config, fingerprint)
        if any(self._round_path(folder, number, s).exists() for s in _SUFFIXES):
            return  # received before (a re-sent round): keep the first copy
        write_durably(self._round_path(folder, number, suffix), data, overwrite=False)

    def _put_job_info(self, folder: Path, job: str, config: str, fingerprint: str) -> None:
        path = folder / _JOB_INFO
        if path.exists():
            try:
                stored = json.loads(json.loads(path.read_text(encoding="utf-8"))["job_config"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidConfigError(
                    f"{path} is unreadable ({exc}); restore it from a backup of the state "
                    "directory, or move the job's folder out of the archive"
                ) from exc
            if stored != json.loads(config):
                raise InvalidConfigError(
                    f"this hospital's archive {folder} already holds job {job!r} under another "
                    "configuration; a job name must not be reused for a different job — rename "
                    "the new job, or move the old job's folder out of the archive"
                )
            return
        info = {"job_config": config, "task_fingerprint": fingerprint}
        text = json.dumps(info, indent=2, sort_keys=True) + "\n"
        write_durably(path, text.encode("utf-8"), overwrite=False)

    def put_summary(self, job: str, summary: Mapping[str, object]) -> None:
        """Replace the job's ``summary.json`` (the job report the coordinator relays).

        Raises
        ------
        InvalidConfigError
            The job name is invalid, or the summary is not plain JSON.
        """
        try:
            text = json.dumps(dict(summary), indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise InvalidConfigError(
                f"job summary of {job!r} is not plain JSON ({exc}); the coordinator must relay "
                "the report as build_report returns it"
            ) from exc
        folder = self._job_dir(job, create=True)
        write_durably(folder / _SUMMARY, text.encode("utf-8"))

    # -- reading ------------------------------------------------------------------

    @staticmethod
    def _round_path(folder: Path, number: int, suffix: str) -> Path:
        return folder / f"round-{number:06d}.{suffix}"

    def jobs(self) -> list[str]:
        """The jobs this archive holds a model or summary of, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _JOB_NAME.fullmatch(p.name) and self._holds_anything(p)
        )

    @staticmethod
    def _holds_anything(folder: Path) -> bool:
        return any(
            p.name in (_JOB_INFO, _SUMMARY) or _ROUND_FILE.fullmatch(p.name)
            for p in folder.iterdir()
        )

    def _existing_job(self, job: str) -> Path:
        folder = self._job_dir(job)
        if not folder.is_dir():
            held = ", ".join(self.jobs()) or "none"
            raise InvalidConfigError(
                f"this hospital's state directory {self.state_dir} holds no models of job "
                f"{job!r} (jobs held: {held}); pass the --state of a hospital that took part, "
                "or one of the jobs held"
            )
        return folder

    def versions(self, job: str) -> list[int]:
        """The rounds whose global model is held, ascending (0 = the initial model)."""
        folder = self._existing_job(job)
        found = (_ROUND_FILE.fullmatch(p.name) for p in folder.iterdir())
        return sorted({int(m.group(1)) for m in found if m})

    def model(self, job: str, server_round: int) -> ModelPayload:
        """The global model of ``server_round``, as received.

        Raises
        ------
        InvalidConfigError
            The job or that round is not held (the message lists the rounds held).
        MalformedUpdateError
            A plaintext model file is unreadable.
        """
        number = _check_round(server_round)
        folder = self._existing_job(job)
        he_path = self._round_path(folder, number, "he")
        if he_path.exists():
            return ModelPayload(envelope=he_path.read_bytes())
        npz_path = self._round_path(folder, number, "npz")
        if npz_path.exists():
            return ModelPayload(arrays=arrays_from_bytes(npz_path.read_bytes()))
        held = ", ".join(map(str, self.versions(job))) or "none"
        raise InvalidConfigError(
            f"job {job!r} has no model version {number} at this hospital; versions held: {held}"
        )

    def job_info(self, job: str) -> tuple[str, str]:
        """``(job_config, task_fingerprint)`` as JSON texts (the fingerprint may be ``""``)."""
        path = self._existing_job(job) / _JOB_INFO
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return str(info["job_config"]), str(info["task_fingerprint"])
        except FileNotFoundError:
            raise InvalidConfigError(
                f"{path} is missing, so job {job!r}'s configuration is unknown; this archive "
                "holds no model of it (it only received a summary)"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidConfigError(
                f"{path} is unreadable ({exc}); restore it from a backup of the state directory"
            ) from exc

    def summary(self, job: str) -> JSONObject | None:
        """The latest job report the coordinator relayed, or ``None`` if none arrived."""
        path = self._existing_job(job) / _SUMMARY
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidConfigError(
                f"{path} is unreadable ({exc}); delete it, the next round relays a new one"
            ) from exc
        if not isinstance(data, dict):
            raise InvalidConfigError(
                f"{path} is not a JSON object; delete it, the next round relays a new one"
            )
        return data


def _json_text(text: object, name: str, *, empty_ok: bool = False) -> str:
    """``text`` if it is JSON text (or ``""`` where allowed); parsed to check, kept verbatim."""
    if not isinstance(text, str):
        raise InvalidConfigError(f"{name} must be JSON text, got {type(text).__name__}")
    if empty_ok and not text:
        return text
    try:
        json.loads(text)
    except ValueError as exc:
        raise InvalidConfigError(
            f"{name} is not valid JSON ({exc}); pass the job's to_json() text"
        ) from exc
    return text
