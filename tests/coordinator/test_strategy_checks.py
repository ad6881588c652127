"""Each check :class:`RoundCollector` runs on a reply, alone: one bad input each.

Every check raises fedvault's error (never a bare exception), and its message
says what is wrong and what to do (the hostile corpus in
``test_hostile_inputs.py`` runs them all through ``collect_train``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from fedvault.coordinator.aggregation import ModelLayout
from fedvault.coordinator.records import Participation
from fedvault.coordinator.strategy import (
    RoundOutcome,
    _check_first_reply,
    _check_identity,
    _check_layout,
    _check_weight,
)
from fedvault.errors import MalformedUpdateError

ACTION = re.compile(r"discard|must|check|run the same|only the first", re.IGNORECASE)
LAYOUT = ModelLayout((("w", (40, 120), "float32"), ("b", (300,), "float64")), (16, 8))


def _refused(call: object, *needles: str) -> str:
    assert callable(call)
    with pytest.raises(MalformedUpdateError) as err:
        call()
    reason = str(err.value)
    for needle in needles:
        assert needle in reason, reason
    assert ACTION.search(reason), f"the reason does not say what to do: {reason}"
    return reason


def test_check_identity() -> None:
    enrolled = {101: "hospital-1", 102: "hospital-2"}
    _check_identity(enrolled, 101, "hospital-1")
    _check_identity(None, 999, "hospital-1")  # a simulation: no enrolment to bind to
    _refused(lambda: _check_identity(enrolled, 999, "hospital-1"), "node 999", "no hospital")
    _refused(
        lambda: _check_identity(enrolled, 102, "hospital-1"),
        "enrolled as 'hospital-2'",
        "speak only for itself",
    )


def test_check_first_reply() -> None:
    outcome = RoundOutcome()
    _check_first_reply(outcome, "hospital-1", 101, False, 3)
    _refused(lambda: _check_first_reply(outcome, "hospital-1", 101, True, 3), "duplicate")
    outcome.record(Participation(hospital="hospital-1", node_id=101, status="ok"))
    _refused(
        lambda: _check_first_reply(outcome, "hospital-1", 102, False, 3),
        "duplicate reply for round 3",
        "node 102",
    )


def test_check_layout() -> None:
    _check_layout(LAYOUT, LAYOUT)
    _check_layout(None, ModelLayout.of_arrays({"z": np.ones(1)}))  # no model recorded
    transposed = ModelLayout((("w", (120, 40), "float32"), LAYOUT.tensors[1]), LAYOUT.encoding)
    _refused(lambda: _check_layout(LAYOUT, transposed), "layout differs", "tensor 0")
    extra = ModelLayout((*LAYOUT.tensors, ("z", (1,), "float32")), LAYOUT.encoding)
    _refused(lambda: _check_layout(LAYOUT, extra), "3 tensors, expected 2")
    rescaled = ModelLayout(LAYOUT.tensors, (20, 8))
    _refused(lambda: _check_layout(LAYOUT, rescaled), "fixed-point encoding")


@pytest.mark.parametrize("weight", [44.0, -45.0, 0.0, 1e300, math.inf, math.nan])
def test_check_weight(weight: float) -> None:
    _check_weight(45.0, 45)
    _check_weight(None, 45)  # plaintext: the reply's count is the weight
    _refused(lambda: _check_weight(weight, 45), "sample_weight", "num-examples 45")
