"""JSON value types: what ``json.dumps`` writes and ``json.loads`` reads back.

For signatures that take or return JSON documents (job configurations, reports,
model cards, job summaries) instead of ``Any``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeAlias

__all__ = ["JSONObject", "JSONValue"]

#: A JSON value as ``json.dumps`` writes it.
JSONValue: TypeAlias = (
    Mapping[str, "JSONValue"] | Sequence["JSONValue"] | str | int | float | bool | None
)
#: A JSON object.
JSONObject: TypeAlias = dict[str, JSONValue]
