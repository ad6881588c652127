"""``IndexedLinkState`` answers a node's pulls exactly as Flower's ``InMemoryLinkState`` does.

Both classes run the same script through Flower's real ``InMemoryGrid`` (messages to
several simulated nodes, pulls with and without a limit, an expired message, deleted
messages, a reply); every pull must return the same messages, in the same order.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import (
    HEARTBEAT_INTERVAL_INF,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    SUPERLINK_NODE_ID,
)
from flwr.proto.task_pb2 import Task  # type: ignore[attr-defined]
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from fedvault.app.sim_linkstate import IndexedLinkState, indexed_linkstate

NODES = 4


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """The process-wide identity ``run_simulation`` sets before its grid creates messages."""
    names = ("_task_id", "_run_id", "_node_id")
    saved = [getattr(TaskIdentity, name) for name in names]
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 11, 7, SUPERLINK_NODE_ID
    yield
    for name, value in zip(names, saved, strict=True):
        setattr(TaskIdentity, name, value)


def _consortium(indexed: bool) -> tuple[InMemoryLinkState, InMemoryGrid, list[int]]:
    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    if indexed:
        with indexed_linkstate():
            state = factory.state()
    else:
        state = factory.state()
    assert isinstance(state, IndexedLinkState) is indexed
    assert isinstance(state, InMemoryLinkState)
    # As run_simulation pre-registers its run and primary task.
    run = Run.create_empty(run_id=7)
    run.primary_task_id = 11
    run.federation_id = NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    nodes = []
    for _ in range(NODES):
        node_id = state.create_node(
            NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, secrets.token_bytes(32), HEARTBEAT_INTERVAL_INF
        )
        state.acknowledge_node_heartbeat(node_id=node_id, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node_id)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def _send(grid: InMemoryGrid, node: int, tag: str, ttl: float | None = None) -> str:
    message = grid.create_message(RecordDict(), f"train.{tag}", node, "", ttl=ttl)
    (message_id,) = grid.push_messages([message])
    return message_id


def _tags(messages: list[Message]) -> list[str]:
    return [m.metadata.message_type for m in messages]


def _script(indexed: bool) -> list[object]:
    """What every pull of a fixed script returns, as message types."""
    state, grid, nodes = _consortium(indexed)
    a, b, c, d = nodes
    seen: list[object] = []
    sends = [(a, "a1"), (b, "b1"), (a, "a2"), (a, "a3")]
    ids = {tag: _send(grid, node, tag) for node, tag in sends}
    _send(grid, c, "c_expiring", ttl=0.05)
    time.sleep(0.1)
    seen.append(_tags(state.get_message_ins(node_id=a, limit=1)))  # a1
    seen.append(_tags(state.get_message_ins(node_id=a, limit=1)))  # a2
    # A delivered message cannot be queued again (Flower refuses it).
    assert state.store_message_ins(state.message_ins_store[ids["a2"]]) is None
    seen.append(_tags(state.get_message_ins(node_id=c, limit=1)))  # expired: nothing
    seen.append(_tags(state.get_message_ins(node_id=d, limit=1)))  # nothing sent
    seen.append(_tags(state.get_message_ins(node_id=b, limit=None)))  # b1
    seen.append(_tags(state.get_message_ins(node_id=b, limit=1)))  # delivered already
    state.delete_messages({ids["a3"]})
    seen.append(_tags(state.get_message_ins(node_id=a, limit=None)))  # a3 deleted: nothing
    _send(grid, a, "a4")
    _send(grid, a, "a5")
    seen.append(_tags(state.get_message_ins(node_id=a, limit=None)))  # a4, a5
    seen.append(_tags(state.get_message_ins(node_id=a, limit=1, run_id=8)))  # other run: nothing
    # A reply travels back and the grid's pull deletes the pair.
    delivered = state.message_ins_store[ids["a1"]]
    reply = Message(RecordDict(), reply_to=delivered)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    assert state.store_message_res(reply) is not None
    seen.append(_tags(list(grid.pull_messages([ids["a1"]]))))
    seen.append(sorted(m.metadata.message_type for m in state.message_ins_store.values()))
    if indexed:
        assert isinstance(state, IndexedLinkState)
        seen.append(("index", dict(state._undelivered), dict(state._dst_of)))
    return seen


def test_every_pull_matches_flowers_own_state() -> None:
    flower, ours = _script(indexed=False), _script(indexed=True)
    index = ours.pop()
    assert ours == flower
    assert flower[:2] == [["train.a1"], ["train.a2"]]
    assert flower[2:4] == [[], []]
    assert flower[7] == ["train.a4", "train.a5"]
    # Nothing left undelivered, so nothing left in the index (no leak across rounds).
    assert index == ("index", {}, {})


def test_the_patch_is_undone_after_the_block() -> None:
    from flwr.server.superlink.linkstate import linkstate_factory

    with indexed_linkstate():
        assert linkstate_factory.InMemoryLinkState is IndexedLinkState
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState
    with pytest.raises(RuntimeError), indexed_linkstate():
        raise RuntimeError("a crashed simulation")
    assert linkstate_factory.InMemoryLinkState is InMemoryLinkState
