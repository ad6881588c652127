"""The coordinator's half of the HE key ceremony: relay, never hold.

The custodian hospital generates the epoch's secret context and returns its
*public* context plus one sealed envelope per recipient. The coordinator keeps
the public context (checked to hold no secret key before anything is stored),
stores the envelopes it cannot open, and forwards each to its hospital. A
hospital that joins later gets its envelope the same way, from the custodian,
when its node first shows up. Every step is an audit event.

On disk, under the coordinator's state directory::

    keys/current-epoch                 the epoch jobs run under (>= 1)
    keys/epoch-N/public.ctx            public HE context (no secret key)
    keys/epoch-N/custodian.pem         the custodian's certificate, for recipients
    keys/epoch-N/sealed/HOSPITAL.env   envelopes, opaque to the coordinator
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, ConfigRecordValues, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedvault.coordinator.records import AuditEvent
from fedvault.coordinator.store import RoundStore
from fedvault.messages import CEREMONY_KEY
from fedvault.privacy.errors import KeyMismatchError, SecretKeyExposureError, StoreError
from fedvault.privacy.he_context import HeContext

__all__ = ["KeyCeremony", "KeyDirectory"]

log = logging.getLogger("fedvault.coordinator")


@dataclass(frozen=True)
class KeyDirectory:
    """The coordinator's key material: public contexts and sealed envelopes only."""

    root: Path

    def current_epoch(self) -> int:
        path = self.root / "current-epoch"
        return int(path.read_text().strip()) if path.exists() else 1

    def bump_epoch(self) -> int:
        """Start a new key epoch (e.g. after a hospital leaves); the next job start re-keys."""
        epoch = self.current_epoch() + 1
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "current-epoch").write_text(f"{epoch}\n")
        return epoch

    def _dir(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch}"

    def public(self, epoch: int) -> HeContext | None:
        path = self._dir(epoch) / "public.ctx"
        return HeContext.from_bytes(path.read_bytes()) if path.exists() else None

    def save_public(self, epoch: int, data: bytes) -> HeContext:
        ctx = HeContext.from_bytes(data)
        if ctx.is_private:
            # Refuse before writing: the coordinator must never hold a secret key.
            raise SecretKeyExposureError(
                f"the custodian sent a HE context WITH its secret key for epoch {epoch}; "
                "it was discarded, not stored. Upgrade or fix the custodian's fedvault "
                "and re-run the key ceremony"
            )
        existing = self.public(epoch)
        if existing is not None and existing.fingerprint != ctx.fingerprint:
            raise KeyMismatchError(
                f"the custodian sent a different public context for epoch {epoch}; "
                "bump the key epoch to re-key instead"
            )
        self._dir(epoch).mkdir(parents=True, exist_ok=True)
        (self._dir(epoch) / "public.ctx").write_bytes(ctx.serialize_public())
        return ctx

    def custodian_cert(self, epoch: int) -> bytes:
        return (self._dir(epoch) / "custodian.pem").read_bytes()

    def save_custodian_cert(self, epoch: int, pem: bytes) -> None:
        (self._dir(epoch) / "custodian.pem").write_bytes(pem)

    def envelope(self, epoch: int, hospital: str) -> bytes | None:
        path = self._dir(epoch) / "sealed" / f"{hospital}.env"
        return path.read_bytes() if path.exists() else None

    def save_envelope(self, epoch: int, hospital: str, data: bytes) -> None:
        path = self._dir(epoch) / "sealed" / f"{hospital}.env"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def blobs(self) -> list[tuple[str, bytes]]:
        """Everything stored here (for the no-secret-key checks)."""
        if not self.root.exists():
            return []
        return [(str(p), p.read_bytes()) for p in sorted(self.root.rglob("*")) if p.is_file()]


@dataclass
class _Node:
    node_id: int
    hospital: str
    epochs: tuple[int, ...]
    custodian: bool


class KeyCeremony:
    """Makes sure every connected hospital holds the current epoch's secret key."""

    def __init__(
        self,
        keys: KeyDirectory,
        *,
        custodian: str,
        store: RoundStore,
        job_id: int | None = None,
        timeout_s: float = 120.0,
        enrolled: Mapping[int, str] | None = None,
    ) -> None:
        self.keys = keys
        # Node id -> hospital from enrolment: a node answers only for its own hospital.
        self.enrolled = None if enrolled is None else dict(enrolled)
        self.custodian = custodian
        self.store = store
        self.job_id = job_id
        self.timeout_s = timeout_s
        self.epoch = keys.current_epoch()
        self._checked: frozenset[int] = frozenset()
        self.hospitals: dict[int, str] = {}  # node id -> hospital, from the last hello

    def _audit(self, kind: str, actor: str, **detail: object) -> None:
        self.store.append_audit(
            AuditEvent(kind=kind, actor=actor, detail={"epoch": self.epoch, **detail}),
            job_id=self.job_id,
        )

    def _ask(self, grid: Grid, node_ids: Sequence[int], body: dict) -> list[ConfigRecord]:
        messages = [
            Message(RecordDict({CEREMONY_KEY: ConfigRecord(body)}), node, MessageType.QUERY)
            for node in node_ids
        ]
        replies = []
        for reply in grid.send_and_receive(messages, timeout=self.timeout_s):
            if reply.has_error():
                log.warning(
                    "key ceremony: node %d failed: %s",
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            replies.append(reply.content.config_records[CEREMONY_KEY])
        return replies

    def _hello(self, grid: Grid, node_ids: Sequence[int]) -> list[_Node]:
        messages = [
            Message(
                RecordDict({CEREMONY_KEY: ConfigRecord({"action": "hello"})}), n, MessageType.QUERY
            )
            for n in node_ids
        ]
        nodes = []
        for reply in grid.send_and_receive(messages, timeout=self.timeout_s):
            if reply.has_error():
                continue
            rec = reply.content.config_records[CEREMONY_KEY]
            node, claimed = reply.metadata.src_node_id, str(rec["hospital"])
            if self.enrolled is not None and self.enrolled.get(node) != claimed:
                # E.g. a hospital posing as the custodian: ignored, and on the record.
                enrolled = self.enrolled.get(node, "no hospital")
                self._audit("node_identity_refused", claimed, node_id=node, enrolled_as=enrolled)
                log.warning(
                    "key ceremony: node %d claims %r, enrolled as %s", node, claimed, enrolled
                )
                continue
            nodes.append(
                _Node(
                    node_id=node,
                    hospital=claimed,
                    epochs=tuple(int(e) for e in rec.get("epochs", [])),  # type: ignore[union-attr]
                    custodian=bool(rec.get("custodian", False)),
                )
            )
        return nodes

    def ensure(self, grid: Grid) -> HeContext:
        """Run (or complete) the ceremony for newly seen nodes; returns the public context."""
        node_ids = frozenset(grid.get_node_ids())
        public = self.keys.public(self.epoch)
        if public is not None and node_ids <= self._checked:
            return public
        deadline = time.monotonic() + self.timeout_s
        while True:
            ask = node_ids
            if public is not None:
                # Only nodes not yet confirmed, plus the custodian in case one of
                # them needs an envelope sealed.
                keeper = {n for n, h in self.hospitals.items() if h == self.custodian}
                ask = (node_ids - self._checked) | (keeper & node_ids)
            nodes = self._hello(grid, sorted(ask))
            self.hospitals.update({n.node_id: n.hospital for n in nodes})
            custodian = [n for n in nodes if n.hospital == self.custodian and n.custodian]
            if custodian or public is not None:
                break
            if time.monotonic() > deadline:
                raise StoreError(
                    f"key custodian {self.custodian!r} is not connected; start its daemon "
                    "(the first key ceremony needs it)"
                )
            time.sleep(2.0)
            node_ids = frozenset(grid.get_node_ids())
        need = [n for n in nodes if self.epoch not in n.epochs and n.hospital != self.custodian]
        missing = [n.hospital for n in need if self.keys.envelope(self.epoch, n.hospital) is None]
        if public is None or missing:
            if not custodian:
                raise StoreError(
                    f"{missing} need the epoch-{self.epoch} key but custodian "
                    f"{self.custodian!r} is not connected"
                )
            public = self._from_custodian(grid, custodian[0], missing)
        installed = self._install(grid, need, public)
        # Confirmed: nodes that said they hold the key, and those that just installed
        # it. A node that did not answer (e.g. its SuperNode was restarting) stays
        # unconfirmed and is asked again before the next round or attempt; marking it
        # done had it refuse every attempt of round 1 for want of a key (soak, 100).
        held = {n.node_id for n in nodes if self.epoch in n.epochs or n.hospital == self.custodian}
        self._checked = self._checked | held | installed
        return public

    def _from_custodian(self, grid: Grid, node: _Node, recipients: list[str]) -> HeContext:
        replies = self._ask(
            grid,
            [node.node_id],
            {"action": "key-ceremony", "epoch": self.epoch, "recipients": recipients},
        )
        if not replies or replies[0].get("status") != "ok":
            reason = str(replies[0].get("reason")) if replies else "no reply"
            raise KeyMismatchError(
                f"key custodian {self.custodian!r} refused the ceremony: {reason}"
            )
        rec = replies[0]
        try:
            public = self.keys.save_public(self.epoch, bytes(rec["public-context"]))  # type: ignore[arg-type]
        except SecretKeyExposureError as exc:
            self._audit("secret_key_refused", self.custodian, reason=str(exc))
            raise
        self.keys.save_custodian_cert(self.epoch, bytes(rec["custodian-cert"]))  # type: ignore[arg-type]
        names = [str(r) for r in rec.get("recipients", [])]  # type: ignore[union-attr]
        blobs = [bytes(b) for b in rec.get("envelopes", [])]  # type: ignore[union-attr,arg-type]
        for name, blob in zip(names, blobs, strict=True):
            self.keys.save_envelope(self.epoch, name, blob)
        self._audit(
            "key_epoch_ready", self.custodian, fingerprint=public.fingerprint, sealed_for=names
        )
        return public

    def _install(self, grid: Grid, nodes: list[_Node], public: HeContext) -> set[int]:
        """Relay every pending envelope in one round trip; the nodes that installed it."""
        if not nodes:
            return set()
        messages = []
        for node in nodes:
            envelope = self.keys.envelope(self.epoch, node.hospital)
            if envelope is None:
                raise StoreError(f"no sealed key for {node.hospital} at epoch {self.epoch}")
            body: dict[str, ConfigRecordValues] = {
                "action": "install-key",
                "epoch": self.epoch,
                "envelope": envelope,
                "custodian-cert": self.keys.custodian_cert(self.epoch),
                "fingerprint": public.fingerprint,
            }
            messages.append(
                Message(
                    RecordDict({CEREMONY_KEY: ConfigRecord(body)}), node.node_id, MessageType.QUERY
                )
            )
        answered: set[str] = set()
        ok: set[str] = set()
        for reply in grid.send_and_receive(messages, timeout=self.timeout_s):
            if reply.has_error():
                continue
            rec = reply.content.config_records[CEREMONY_KEY]
            hospital = str(rec.get("hospital", ""))
            answered.add(hospital)
            if rec.get("status") == "ok":
                ok.add(hospital)
                self._audit("key_installed", hospital)
            else:
                self._audit("key_install_refused", hospital, reason=str(rec.get("reason")))
                log.warning(
                    "%s did not install the epoch-%d key: %s",
                    hospital,
                    self.epoch,
                    rec.get("reason"),
                )
        for node in nodes:
            if node.hospital not in answered:
                self._audit("key_install_refused", node.hospital, reason="no reply")
        # By node and by claimed name: the install reply's "hospital" must be the node's.
        return {node.node_id for node in nodes if node.hospital in ok}
