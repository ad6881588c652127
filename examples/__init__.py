"""fedvault's built-in tasks, on data that ships with scikit-learn or is generated.

Each module defines a :class:`~fedvault.task.Task` called ``TASK`` and is
registered as an entry point of the ``fedvault.tasks`` group (see
``pyproject.toml``), exactly as a consortium's own task package registers its
task: ``fedvault simulate --example NAME`` (or ``--task NAME``) and a job
file's ``task = "NAME"`` find them through :mod:`fedvault.task_registry`.

The modules are imported on first use, not with this package: so
``python -m fedvault.examples.digits`` runs the module once, as ``__main__``,
and importing this package loads neither torch nor scikit-learn's data sets.
"""

from __future__ import annotations

from fedvault.task import Task, TrainingDefaults

__all__ = ["BUILT_IN", "Task", "TrainingDefaults", "get_example"]

#: The built-in tasks' entry-point names, in the order listings show them.
BUILT_IN = ("breast-cancer", "digits", "diabetes", "imaging")


def get_example(name: str) -> Task:
    """The task registered as ``name`` (a built-in example or any installed task).

    Raises
    ------
    InvalidConfigError
        If no installed task has that name, naming the ones there are.
    """
    from fedvault.task_registry import load_task

    return load_task(name).task
