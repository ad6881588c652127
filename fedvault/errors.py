"""One exception tree for fedvault.

Every error a user can meet derives from :class:`FedvaultError`, and its message
says what went wrong *and what to do about it*. The CLI turns these into a
one-line message and exit code 2; daemons log them and, where a peer is at
fault, report the reason back instead of crashing.
"""

from __future__ import annotations

__all__ = [
    "BudgetExhaustedError",
    "DataError",
    "FedvaultError",
    "InvalidConfigError",
    "KeyMismatchError",
    "MalformedUpdateError",
    "PolicyRefusalError",
    "SecretKeyExposureError",
    "StoreError",
    "TaskMismatchError",
]


class FedvaultError(Exception):
    """Base class of every error fedvault raises on purpose."""


class InvalidConfigError(FedvaultError, ValueError):
    """A configuration value is outside its valid domain.

    The message names the parameter, the value given and the valid range.
    """


class BudgetExhaustedError(FedvaultError):
    """Training this round would push a hospital past its privacy budget."""


class KeyMismatchError(FedvaultError):
    """An update or model was encrypted under another HE key or key epoch.

    Raised *before* any homomorphic arithmetic: adding ciphertexts under
    different keys does not fail, it silently produces garbage.
    """


class MalformedUpdateError(FedvaultError, ValueError):
    """An update envelope cannot be parsed, or its shape/weight/metrics are invalid."""


class SecretKeyExposureError(FedvaultError):
    """A secret HE context was about to leave a hospital (or reached the coordinator)."""


class StoreError(FedvaultError):
    """The round store is unreachable, inconsistent, or holds another job's state."""


class DataError(FedvaultError):
    """A hospital's data set is missing, malformed, or too small to train on."""


class PolicyRefusalError(FedvaultError):
    """A hospital's site policy does not allow this job (task, version, ε, δ or size).

    The hospital refuses before any training; the reason travels to the
    coordinator, which audits it.
    """


class TaskMismatchError(FedvaultError):
    """A party runs different task code or model architecture than the coordinator.

    The message names both sides' values (distribution, version, code hash,
    architecture), so the operator can see who must upgrade.
    """
