"""Find a job's task: an installed entry point or ``module:attribute``.

A job names its task once (``task = "oncology"`` or ``task =
"oncology_task:TASK"`` in the job file; ``fedvault simulate --task`` or
``--example``). Every party resolves the name in its *own* environment: the
coordinator never ships code, so each party installs the task's distribution
itself, and the task fingerprint (:mod:`fedvault.fingerprint`) proves they
installed the same thing.

Entry points live in the group ``fedvault.tasks``; fedvault's built-in
examples are registered there like any other task (``pyproject.toml``).

The coordinator daemon only supervises and must not load torch: it reads a
task's description (name, kind, training defaults, fingerprint) through
:func:`describe`, which imports the task in a short-lived child process.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from fedvault.errors import InvalidConfigError
from fedvault.task import Task, TrainingDefaults

__all__ = [
    "ENTRY_POINT_GROUP",
    "LoadedTask",
    "TaskDescription",
    "describe",
    "installed_tasks",
    "load_task",
]

ENTRY_POINT_GROUP = "fedvault.tasks"
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DESCRIBE_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class LoadedTask:
    """A resolved task, with the reference it was named by and the module it came from."""

    reference: str
    module: str
    task: Task


def installed_tasks() -> dict[str, str]:
    """Entry-point name -> ``module:attribute`` of every installed task."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_task(reference: str) -> LoadedTask:
    """Import the task ``reference`` names.

    ``reference`` is an entry-point name of the ``fedvault.tasks`` group (the
    built-in examples: ``breast-cancer``, ``digits``, ...) or
    ``module:attribute``.

    Raises
    ------
    InvalidConfigError
        Unknown name, a module that fails to import, or an attribute that is
        not a :class:`~fedvault.task.Task`; the message says what to install or fix.
    """
    if not isinstance(reference, str) or not reference.strip():
        raise InvalidConfigError("task must be a non-empty name or module:attribute")
    target = reference
    if not _REFERENCE.match(reference):
        known = installed_tasks()
        if reference not in known:
            names = ", ".join(sorted(known)) or "none"
            raise InvalidConfigError(
                f"unknown task {reference!r}: installed tasks are {names}; install the "
                "task's distribution (it registers an entry point in the 'fedvault.tasks' "
                "group) or name it as module:attribute"
            )
        target = known[reference]
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or anything the module raises on import
        raise InvalidConfigError(
            f"task {reference!r} fails to import: module {module_name!r} raised "
            f"{type(exc).__name__}: {exc}; install the task's distribution in this "
            "environment (or add its directory to PYTHONPATH) and fix the error"
        ) from exc
    task = getattr(module, attr, None)
    if not isinstance(task, Task):
        what = "does not exist" if task is None else f"is a {type(task).__name__}"
        raise InvalidConfigError(
            f"task {reference!r}: {module_name}.{attr} {what}, not a fedvault.task.Task; "
            "point the reference at the module's Task object"
        )
    return LoadedTask(reference=reference, module=module_name, task=task)


@dataclass(frozen=True)
class TaskDescription:
    """What a process that never trains needs of a task (no torch in it)."""

    reference: str
    name: str
    kind: str
    num_outputs: int
    defaults: TrainingDefaults
    best_metric: str
    fingerprint_json: str


def _describe_here(reference: str) -> dict[str, Any]:
    from dataclasses import asdict

    from fedvault.fingerprint import fingerprint_task

    loaded = load_task(reference)
    task = loaded.task
    return {
        "reference": reference,
        "name": task.name,
        "kind": task.kind,
        "num_outputs": task.num_outputs,
        "defaults": asdict(task.defaults),
        "best_metric": task.best_metric,
        "fingerprint_json": fingerprint_task(task, loaded.module).to_json(),
    }


@functools.lru_cache(maxsize=32)
def describe(reference: str) -> TaskDescription:
    """Describe the task ``reference`` names, importing it in a child process.

    The child loads torch and the task's model to compute the fingerprint; the
    caller stays light. Errors come back as the same one-line
    :class:`InvalidConfigError` :func:`load_task` raises.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedvault.task_registry", reference],
            capture_output=True,
            text=True,
            timeout=_DESCRIBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InvalidConfigError(
            f"task {reference!r} took over {_DESCRIBE_TIMEOUT_S:.0f} s to import; "
            "check what its module does at import time"
        ) from None
    lines = done.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if "error" in result:
        raise InvalidConfigError(str(result["error"]))
    if done.returncode != 0 or "name" not in result:
        raise InvalidConfigError(
            f"task {reference!r} could not be described (exit {done.returncode}): "
            f"{done.stderr.strip()[-500:]}"
        )
    result["defaults"] = TrainingDefaults(**result["defaults"])
    return TaskDescription(**result)


def _main(argv: list[str]) -> int:
    """``python -m fedvault.task_registry REFERENCE``: one JSON line on stdout."""
    try:
        print(json.dumps(_describe_here(argv[0])))
    except InvalidConfigError as exc:
        print(json.dumps({"error": str(exc)}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
