"""Runnable federated tasks on data that ships with scikit-learn.

Each example is an :class:`Example`: a model factory, a data loader and
training defaults tuned for DP-SGD at ε = 3. ``fedvault simulate --example
NAME`` looks them up here; a researcher's own task is just another
:class:`Example` passed to :func:`fedvault.simulation.simulate`.

The example modules are imported on first use, not with this package: so
``python -m fedvault.examples.digits`` runs the module once, as ``__main__``,
and importing the registry does not load scikit-learn's data sets.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from fedvault.examples.task import Example, TrainingDefaults
from fedvault.privacy.errors import InvalidConfigError

__all__ = [
    "DEFAULTS",
    "EXAMPLES",
    "Example",
    "ExampleSpec",
    "TrainingDefaults",
    "example_spec",
    "get_example",
]

_MODULES = {
    "breast-cancer": "fedvault.examples.breast_cancer",
    "digits": "fedvault.examples.digits",
}

#: Each example's tuned training defaults, kept here rather than in its module so a
#: job file can be read (by the coordinator daemon, say) without importing torch.
DEFAULTS: Mapping[str, TrainingDefaults] = MappingProxyType(
    {
        "breast-cancer": TrainingDefaults(
            batch_size=256, learning_rate=4.0, local_epochs=2, max_grad_norm=1.0, momentum=0.0
        ),
        "digits": TrainingDefaults(
            batch_size=512, learning_rate=4.0, local_epochs=3, max_grad_norm=1.0, momentum=0.0
        ),
    }
)


@dataclass(frozen=True)
class ExampleSpec:
    """A built-in example's name and defaults: what a job configuration needs of it."""

    name: str
    defaults: TrainingDefaults


def example_spec(name: str) -> ExampleSpec:
    """The name and training defaults of the built-in example ``name``, without
    importing its model or data (no torch, no scikit-learn).

    Raises
    ------
    InvalidConfigError
        If there is none, naming the choices.
    """
    _module(name)
    return ExampleSpec(name, DEFAULTS[name])


def _module(name: str) -> str:
    """The module of the built-in example ``name``; one check of the name for both lookups."""
    module = _MODULES.get(name)
    if module is None:
        raise InvalidConfigError(f"unknown example {name!r}: choose one of {', '.join(_MODULES)}")
    return module


#: The built-in examples by name (read-only; built on first access).
EXAMPLES: Mapping[str, Example]


def get_example(name: str) -> Example:
    """Return the built-in example called ``name``.

    Raises
    ------
    InvalidConfigError
        If there is none, naming the choices.
    """
    example: Example = importlib.import_module(_module(name)).EXAMPLE
    return example


def __getattr__(name: str) -> Any:
    # PEP 562: build EXAMPLES lazily, then cache it as a plain module attribute.
    if name == "EXAMPLES":
        examples = MappingProxyType({key: get_example(key) for key in _MODULES})
        globals()["EXAMPLES"] = examples
        return examples
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
