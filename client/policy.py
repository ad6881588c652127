"""A hospital's site policy: which tasks it agrees to train, within which privacy limits.

The coordinator proposes jobs; a hospital decides. Before any training, the
client daemon checks each job against a small TOML file that the hospital, not
the consortium, controls. Secure by default: with no policy file nothing is
allowed, and a ``[[tasks]]`` list that is empty allows nothing either.

A refusal is a :class:`PolicyRefusalError` carrying *one* self-contained reason
(the first rule that fails): it travels to the coordinator, lands in its audit
log and in ``fedvault status``, so it names the policy file, the task, the value
the job asked for and the limit it broke. A file that does not parse, or holds
a value outside its domain, is an :class:`InvalidConfigError` naming the file,
the key, the value and what a valid value is: a typo in a privacy limit must
stop the daemon, not silently loosen the limit.

File format (``fedvault client start --policy PATH``; default
``STATE_DIR/policy.toml``)::

    # fedvault site policy: what this hospital agrees to train.
    [limits]
    max_epsilon_per_job = 3.0     # refuse a job whose ε budget is larger
    max_epsilon_total = 10.0      # refuse if ε spent in other jobs + this job's ε exceeds it
    max_delta = 1e-5              # refuse a larger δ
    min_records = 50              # refuse to train on fewer training records than this

    [[tasks]]
    name = "oncology-mlp"          # the task's name (Task.name)
    versions = ["0.1.0"]           # optional: allowed versions of the task's distribution
    fingerprints = ["sha256:..."]  # optional: allowed task fingerprints (exact strings,
                                   # as `fedvault task show` prints them)

    [[tasks]]
    name = "cardiology-cnn"        # any version, any fingerprint

Every ``[limits]`` key is optional: absent means no limit, except
``min_records``, which defaults to 1. ``versions`` and ``fingerprints`` are
optional too (absent: any); when given they must be non-empty lists. Pure
policy logic: this module imports neither Flower nor torch.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedvault.durable import atomic_write
from fedvault.errors import InvalidConfigError, PolicyRefusalError

__all__ = ["POLICY_FILE", "AllowedTask", "SitePolicy", "write_policy"]

POLICY_FILE = "policy.toml"  # the default policy's name inside the client's state directory

_HOWTO = (
    "see fedvault.client.policy for the format; pass the file with "
    "`fedvault client start --policy PATH` (default STATE_DIR/policy.toml)"
)
_EXAMPLE = (
    '[[tasks]] name = "TASK" and [limits] max_epsilon_per_job = 3.0, '
    "max_epsilon_total = 10.0, max_delta = 1e-5, min_records = 50 (one key per line)"
)
# Relative slack on the ε-total sum, so 0.1 + 0.2 under a limit of 0.3 is not refused
# for floating-point rounding alone; far below any ε that matters.
_REL_TOL = 1e-9


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_positive(v: Any) -> bool:
    return _is_number(v) and v > 0


def _is_name(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and v == v.strip()


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_is_name(s) for s in v)


_NO_LIMIT = " (omit the key for no limit)"
_ANY = " (omit the key to allow any)"
# key -> (valid?, what a valid value is): the whole schema of a policy file.
_LIMITS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epsilon_per_job": (_is_positive, "a positive finite number such as 3.0" + _NO_LIMIT),
    "max_epsilon_total": (_is_positive, "a positive finite number such as 10.0" + _NO_LIMIT),
    "max_delta": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1) such as 1e-5"),
    "min_records": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "a positive integer such as 50 (default 1)",
    ),
}
_TASK_KEYS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_is_name, 'the task\'s name as a non-empty string, e.g. name = "oncology-mlp"'),
    "versions": (_is_names, 'a non-empty list of version strings, e.g. ["0.1.0"]' + _ANY),
    "fingerprints": (_is_names, "a non-empty list of `fedvault task show` fingerprints" + _ANY),
}
_TOP = ("limits", "tasks")


@dataclass(frozen=True)
class AllowedTask:
    """One ``[[tasks]]`` entry: a task the hospital agrees to train.

    Empty ``versions`` or ``fingerprints`` mean "any": a hospital that has not
    pinned them trusts the consortium's choice of code for this task.
    """

    name: str
    versions: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()


def _bad(
    source: Path, key: str, want: str, value: Any, missing: bool = False
) -> InvalidConfigError:
    """The error for ``key`` of the policy at ``source`` not being ``want`` (or missing)."""
    got = "it is missing" if missing else f"got {value!r}"
    return InvalidConfigError(f"site policy {source}: {key} must be {want}; {got}")


def _refuse_unknown(
    source: Path, table: Mapping[str, Any], known: Sequence[str], where: str
) -> None:
    """Refuse the keys of ``table`` (``where`` in the policy) that are not ``known``."""
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise InvalidConfigError(
            f"site policy {source}: unknown keys {unknown} {where}; the known keys "
            f"are {sorted(known)} (format: see fedvault.client.policy)"
        )


def _allowed_task(source: Path, i: int, entry: Mapping[str, Any]) -> AllowedTask:
    """The ``i``-th ``[[tasks]]`` entry, checked against :data:`_TASK_KEYS`."""
    where = f"[[tasks]] entry {i}"
    if _is_name(entry.get("name")):
        where += f" ({entry['name']!r})"
    _refuse_unknown(source, entry, list(_TASK_KEYS), f"in {where}")
    if "name" not in entry:
        raise _bad(source, f"{where} name", _TASK_KEYS["name"][1], None, missing=True)
    for key, value in entry.items():
        valid, want = _TASK_KEYS[key]
        if not valid(value):
            raise _bad(source, f"{where} {key}", want, value)
    return AllowedTask(
        name=entry["name"],
        versions=tuple(entry.get("versions", ())),
        fingerprints=tuple(entry.get("fingerprints", ())),
    )


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """A hospital's site policy, read once from its TOML file (format: module docstring).

    ``source`` is kept so every refusal names the file the hospital must edit.
    """

    source: Path
    tasks: tuple[AllowedTask, ...] = ()
    max_epsilon_per_job: float | None = None
    max_epsilon_total: float | None = None
    max_delta: float | None = None
    min_records: int = 1

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read and check a policy file.

        A missing file is a :class:`PolicyRefusalError` (no policy, no
        training); a file that cannot be read or parsed, or holds a bad value,
        is an :class:`InvalidConfigError`.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyRefusalError(
                f"no site policy at {path}: this hospital allows no task until it writes one; "
                f"e.g. {_EXAMPLE}, in {path}; {_HOWTO}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidConfigError(
                f"site policy {path} cannot be read as UTF-8 text ({exc}); fix the file or "
                f"its permissions; {_HOWTO}"
            ) from exc
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidConfigError(
                f"site policy {path} is not valid TOML ({exc}); {_HOWTO}"
            ) from exc
        return cls.from_mapping(raw, source=path)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object], *, source: Path) -> SitePolicy:
        """Build a policy from parsed TOML; ``source`` names it in error messages."""
        _refuse_unknown(source, raw, _TOP, "at the top level ([limits] and [[tasks]] only)")
        limits = raw.get("limits", {})
        if not isinstance(limits, dict):
            raise _bad(source, "limits", "a [limits] table", limits)
        _refuse_unknown(source, limits, list(_LIMITS), "in [limits]")
        for key, value in limits.items():
            valid, want = _LIMITS[key]
            if not valid(value):
                raise _bad(source, f"[limits] {key}", want, value)
        entries = raw.get("tasks", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise _bad(
                source, "tasks", 'a list of [[tasks]] tables, each with name = "TASK"', entries
            )
        tasks = [_allowed_task(source, i, entry) for i, entry in enumerate(entries, start=1)]
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise InvalidConfigError(
                f"site policy {source}: [[tasks]] name {dupes} listed more than once; each "
                "name must appear in one entry only (merge their versions and fingerprints)"
            )

        def limit(key: str) -> float | None:
            return float(limits[key]) if key in limits else None

        return cls(
            source=source,
            tasks=tuple(tasks),
            max_epsilon_per_job=limit("max_epsilon_per_job"),
            max_epsilon_total=limit("max_epsilon_total"),
            max_delta=limit("max_delta"),
            min_records=int(limits.get("min_records", 1)),
        )

    def check(
        self,
        *,
        task: str,
        version: str,
        fingerprint: str,
        epsilon: float,
        delta: float,
        records: int,
        spent_elsewhere: float = 0.0,
    ) -> None:
        """Refuse a job the policy does not allow, with the first failing rule's reason.

        Rules, in order: task listed, version allowed, fingerprint allowed,
        ``epsilon <= max_epsilon_per_job``, ``delta <= max_delta``,
        ``spent_elsewhere + epsilon <= max_epsilon_total``,
        ``records >= min_records``. An ε or δ that is not a number in range
        (NaN would pass every comparison) is refused too: fail closed. The
        :class:`PolicyRefusalError` is self-contained: the coordinator audits it.
        """
        src = f"site policy {self.source}"
        entry = next((t for t in self.tasks if t.name == task), None)
        if entry is None:
            allowed = ", ".join(t.name for t in self.tasks) or "none"
            raise PolicyRefusalError(
                f"{src} does not allow task {task!r} (allowed: {allowed}); add a [[tasks]] "
                f"entry with name = {_toml(task)} to that file to train it"
            )
        job = f"{src} refuses task {task!r}"
        if entry.versions and version not in entry.versions:
            raise PolicyRefusalError(
                f"{job} at version {version!r}: allowed versions are "
                f"{', '.join(entry.versions)}; add {version!r} to that entry's versions once "
                "the hospital has reviewed that release"
            )
        if entry.fingerprints and fingerprint not in entry.fingerprints:
            raise PolicyRefusalError(
                f"{job} with fingerprint {_short(fingerprint)}: allowed fingerprints are "
                f"{', '.join(map(_short, entry.fingerprints))} (the job's code differs from "
                "what the hospital approved); add the full fingerprint `fedvault task show` "
                "prints to that entry's fingerprints once the hospital has reviewed it"
            )
        if not (_is_number(epsilon) and epsilon > 0):
            raise PolicyRefusalError(f"{job}: the job asks ε = {epsilon!r}, not a positive number")
        if not (_is_number(delta) and 0 <= delta < 1):
            raise PolicyRefusalError(f"{job}: the job asks δ = {delta!r}, not a number in [0, 1)")
        if not (_is_number(spent_elsewhere) and spent_elsewhere >= 0):
            raise PolicyRefusalError(f"{job}: ε spent elsewhere = {spent_elsewhere!r} is invalid")
        if self.max_epsilon_per_job is not None and epsilon > self.max_epsilon_per_job:
            raise PolicyRefusalError(
                f"{job}: the job asks ε = {_num(epsilon)}, above max_epsilon_per_job = "
                f"{_num(self.max_epsilon_per_job)}; the job must lower its ε, or the hospital "
                "raise that limit"
            )
        if self.max_delta is not None and delta > self.max_delta:
            raise PolicyRefusalError(
                f"{job}: the job asks δ = {_num(delta)}, above max_delta = "
                f"{_num(self.max_delta)}; the job must lower its δ, or the hospital raise that "
                "limit"
            )
        total = spent_elsewhere + epsilon
        limit = self.max_epsilon_total
        if limit is not None and total > limit and not math.isclose(total, limit, rel_tol=_REL_TOL):
            raise PolicyRefusalError(
                f"{job}: ε already spent in other jobs ({_num(spent_elsewhere)}) + this job's "
                f"ε ({_num(epsilon)}) = {_num(total)} would exceed max_epsilon_total = "
                f"{_num(limit)}; {_num(max(limit - spent_elsewhere, 0.0))} remains for new jobs"
            )
        if records < self.min_records:
            raise PolicyRefusalError(
                f"{job}: this hospital has {records} training records, fewer than "
                f"min_records = {self.min_records}; too few records expose each patient more "
                "and give DP-SGD almost no signal"
            )


def write_policy(
    path: Path,
    *,
    tasks: Sequence[str | AllowedTask],
    max_epsilon_per_job: float | None = None,
    max_epsilon_total: float | None = None,
    max_delta: float | None = None,
    min_records: int = 1,
) -> Path:
    """Write a valid policy file (for ``fedvault demo`` and tests) and return its path.

    The text is checked before it replaces anything, so a bad call never
    overwrites a good policy; written with :func:`fedvault.durable.atomic_write`
    (mode 0644: the policy is not a secret), so a crash leaves the old file or
    the new one, never half of one.
    """
    path = Path(path)
    lines = [
        "# fedvault site policy: what this hospital agrees to train.",
        "# Format: see fedvault.client.policy. Without a [[tasks]] entry, no task is allowed.",
        "\n[limits]",
    ]
    limits = (
        ("max_epsilon_per_job", max_epsilon_per_job),
        ("max_epsilon_total", max_epsilon_total),
        ("max_delta", max_delta),
    )
    lines += [f"{key} = {_toml(value, real=True)}" for key, value in limits if value is not None]
    lines.append(f"min_records = {_toml(min_records)}")
    for item in tasks:
        entry = AllowedTask(item) if isinstance(item, str) else item
        lines += ["\n[[tasks]]", f"name = {_toml(entry.name)}"]
        if entry.versions:
            lines.append(f"versions = {_toml(list(entry.versions))}")
        if entry.fingerprints:
            lines.append(f"fingerprints = {_toml(list(entry.fingerprints))}")
    text = "\n".join(lines) + "\n"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # e.g. a lone surrogate in a name
        raise InvalidConfigError(f"write_policy {path}: cannot encode the policy ({exc})") from exc
    SitePolicy.from_mapping(raw, source=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text, 0o644)
    SitePolicy.load(path)
    return path


# --- internals -----------------------------------------------------------------------------


def _num(x: float) -> str:
    """Shortest round-trip form, so a refusal never shows ``3 > 3`` for 3.0000001 > 3."""
    return repr(float(x))


def _short(fingerprint: str) -> str:
    """Enough of a fingerprint to tell it apart in a message (``sha256:`` + 16 hex digits)."""
    return fingerprint if len(fingerprint) <= 26 else fingerprint[:23] + "..."


def _toml(value: Any, *, real: bool = False) -> str:
    """A TOML literal for a str, int, float or list of them; ``real``: write ints as floats."""
    if isinstance(value, bool):
        return "true" if value else "false"  # refused by validation, with the key named
    if isinstance(value, int | float):
        return repr(float(value)) if real else repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise InvalidConfigError(
        f"write_policy: {value!r} is a {type(value).__name__}, not a str, int, float or list"
    )


def _toml_char(c: str) -> str:
    if c.isprintable() and c not in '"\\':
        return c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
