"""Runnable federated tasks on data that ships with scikit-learn.

Each example is an :class:`Example`: a model factory, a data loader and
training defaults tuned for DP-SGD at ε = 3. ``fedvault simulate --example
NAME`` looks them up here; a researcher's own task is just another
:class:`Example` passed to :func:`fedvault.simulation.simulate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from fedvault.examples.breast_cancer import EXAMPLE as _BREAST_CANCER
from fedvault.examples.digits import EXAMPLE as _DIGITS
from fedvault.examples.task import Example, TrainingDefaults
from fedvault.privacy.errors import InvalidConfigError

__all__ = ["EXAMPLES", "Example", "TrainingDefaults", "get_example"]

#: The built-in examples by name (read-only).
EXAMPLES: Mapping[str, Example] = MappingProxyType(
    {example.name: example for example in (_BREAST_CANCER, _DIGITS)}
)


def get_example(name: str) -> Example:
    """Return the built-in example called ``name``.

    Raises
    ------
    InvalidConfigError
        If there is none, naming the choices.
    """
    try:
        return EXAMPLES[name]
    except KeyError:
        raise InvalidConfigError(
            f"unknown example {name!r}: choose one of {', '.join(EXAMPLES)}"
        ) from None
