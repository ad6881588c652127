"""Flower's in-memory LinkState with each node's undelivered messages indexed.

Flower 1.41's simulation runtime asks the LinkState, every 0.1 s and for every
simulated node, for that node's next message, and ``InMemoryLinkState`` answers
by scanning (and re-validating) every stored message. With ``H`` hospitals and a
round's ``H`` messages in flight, one sweep costs ``H^2`` checks on the thread
that shares the GIL with the ServerApp: 1,000 hospitals spent most of the
coordinator process there, and the sweep, not the hospitals, set the pace.

``IndexedLinkState`` keeps, per destination node, the ids of its stored and not
yet delivered messages, and answers from them alone, with the same per-message
checks (expiry, federation) and the same delivery marking as Flower.
``indexed_linkstate()`` makes Flower's simulation build it instead of its own
class, for the duration of one ``run_simulation``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flwr.app import Message
from flwr.server.superlink.linkstate import in_memory_linkstate, linkstate_factory
from flwr.supercore.date import now

__all__ = ["IndexedLinkState", "indexed_linkstate"]


class IndexedLinkState(in_memory_linkstate.InMemoryLinkState):
    """``InMemoryLinkState`` whose ``get_message_ins`` reads only the node's own messages."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # dst node -> its undelivered message ids, in arrival order (dict as ordered set)
        self._undelivered: dict[int, dict[str, None]] = {}
        self._dst_of: dict[str, int] = {}

    def store_message_ins(self, message: Message) -> str | None:
        """Store one message (Flower's checks) and index it under its destination."""
        message_id = super().store_message_ins(message)
        if message_id is not None:
            with self.lock:
                stored = self.message_ins_store.get(message_id)
                # A duplicate id is answered with the stored message's id: index only
                # what is still waiting for delivery.
                if stored is not None and stored.metadata.delivered_at == "":
                    dst = stored.metadata.dst_node_id
                    self._dst_of[message_id] = dst
                    self._undelivered.setdefault(dst, {})[message_id] = None
        return message_id

    def delete_messages(self, message_ins_ids: set[str]) -> None:
        """Delete messages and their replies (Flower's), and drop them from the index."""
        super().delete_messages(message_ins_ids)
        with self.lock:
            for message_id in message_ins_ids:
                self._unindex(message_id)

    def get_message_ins(
        self, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Message]:
        """The node's undelivered messages (at most ``limit``), marked delivered."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found: list[Message] = []
        with self.lock:
            candidates = list(self._undelivered.get(node_id, ()))
            for message_id in candidates:
                # Flower's own expiry and federation checks, which delete what fails them.
                self._check_stored_messages({message_id})
                message = self.message_ins_store.get(message_id)
                if (
                    message is not None
                    and (run_id is None or message.metadata.run_id == run_id)
                    and message.metadata.delivered_at == ""
                ):
                    found.append(message)
                if limit and len(found) == limit:
                    break
            delivered_at = now().isoformat()
            for message in found:
                message.metadata.delivered_at = delivered_at
                self._unindex(message.metadata.message_id)
        return found

    def _unindex(self, message_id: str) -> None:
        dst = self._dst_of.pop(message_id, None)
        if dst is None:
            return
        pending = self._undelivered[dst]
        pending.pop(message_id, None)
        if not pending:
            del self._undelivered[dst]


@contextlib.contextmanager
def indexed_linkstate() -> Iterator[None]:
    """Have Flower's ``LinkStateFactory`` build ``IndexedLinkState`` inside the block."""
    original = linkstate_factory.InMemoryLinkState
    linkstate_factory.InMemoryLinkState = IndexedLinkState  # type: ignore[misc]
    try:
        yield
    finally:
        linkstate_factory.InMemoryLinkState = original  # type: ignore[misc]
