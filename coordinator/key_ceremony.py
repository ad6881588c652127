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

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedvault.coordinator.records import AuditEvent
from fedvault.coordinator.store import RoundStore
from fedvault.durable import atomic_write
from fedvault.errors import (
    KeyMismatchError,
    MalformedUpdateError,
    SecretKeyExposureError,
    StoreError,
)
from fedvault.messages import (
    CeremonyRequest,
    HelloReply,
    HelloRequest,
    InstallKeyReply,
    InstallKeyRequest,
    RefusalCode,
    ReplyStatus,
    SealKeyReply,
    SealKeyRequest,
)
from fedvault.privacy.he_context import HeContext

__all__ = ["KeyCeremony", "KeyDirectory"]

log = logging.getLogger("fedvault.coordinator")


@dataclass(frozen=True)
class KeyDirectory:
    """The coordinator's key material: public contexts and sealed envelopes only."""

    root: Path

    def current_epoch(self) -> int:
        """The current key epoch (1 until the first :meth:`bump_epoch`)."""
        path = self.root / "current-epoch"
        return int(path.read_text().strip()) if path.exists() else 1

    def bump_epoch(self) -> int:
        """Start a new key epoch (e.g. after a hospital leaves); the next job start re-keys."""
        epoch = self.current_epoch() + 1
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "current-epoch", f"{epoch}\n", 0o644)
        return epoch

    def _dir(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch}"

    def public(self, epoch: int) -> HeContext | None:
        """The public HE context of ``epoch``, or ``None`` if not stored yet."""
        path = self._dir(epoch) / "public.ctx"
        return HeContext.from_bytes(path.read_bytes()) if path.exists() else None

    def save_public(self, epoch: int, data: bytes) -> HeContext:
        """Store the public context of ``epoch``; refuse a secret one or a different one."""
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
        atomic_write(self._dir(epoch) / "public.ctx", ctx.serialize_public(), 0o644)
        return ctx

    def custodian_cert(self, epoch: int) -> bytes:
        """The custodian's certificate (PEM) that signed the envelopes of ``epoch``."""
        return (self._dir(epoch) / "custodian.pem").read_bytes()

    def save_custodian_cert(self, epoch: int, pem: bytes) -> None:
        """Store the custodian's certificate (PEM) for ``epoch``."""
        self._dir(epoch).mkdir(parents=True, exist_ok=True)
        atomic_write(self._dir(epoch) / "custodian.pem", pem, 0o644)

    def envelope(self, epoch: int, hospital: str) -> bytes | None:
        """The key envelope of ``epoch`` sealed to ``hospital``, or ``None`` if not stored."""
        path = self._dir(epoch) / "sealed" / f"{hospital}.env"
        return path.read_bytes() if path.exists() else None

    def save_envelope(self, epoch: int, hospital: str, data: bytes) -> None:
        """Store the key envelope of ``epoch`` sealed to ``hospital``."""
        path = self._dir(epoch) / "sealed" / f"{hospital}.env"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)  # sealed to one hospital, but still 0600

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

    def _send(self, grid: Grid, requests: Sequence[tuple[int, CeremonyRequest]]) -> list[Message]:
        """Send each (node, request); the replies that are not Flower errors."""
        messages = [
            Message(request.to_content(), node, MessageType.QUERY) for node, request in requests
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
            replies.append(reply)
        return replies

    def _malformed(self, node: int, exc: MalformedUpdateError) -> None:
        """A reply that does not parse: ignored (the node stays unconfirmed), and on the record."""
        actor = (self.enrolled or {}).get(node) or self.hospitals.get(node) or f"node-{node}"
        self._audit("key_ceremony_reply_rejected", actor, node_id=node, reason=str(exc))
        log.warning("key ceremony: node %d sent a malformed reply: %s", node, exc)

    def _hello(self, grid: Grid, node_ids: Sequence[int]) -> list[_Node]:
        nodes = []
        for reply in self._send(grid, [(n, HelloRequest()) for n in node_ids]):
            node = reply.metadata.src_node_id
            try:
                hello = HelloReply.from_message(reply)
            except MalformedUpdateError as exc:
                self._malformed(node, exc)
                continue
            claimed = hello.hospital
            if self.enrolled is not None and self.enrolled.get(node) != claimed:
                # E.g. a hospital posing as the custodian: ignored, and on the record.
                enrolled = self.enrolled.get(node, "no hospital")
                self._audit("node_identity_refused", claimed, node_id=node, enrolled_as=enrolled)
                log.warning(
                    "key ceremony: node %d claims %r, enrolled as %s", node, claimed, enrolled
                )
                continue
            if hello.status is not ReplyStatus.OK:
                log.warning(
                    "key ceremony: %s refused to say hello [%s]: %s",
                    claimed,
                    hello.code,
                    hello.reason,
                )
                continue
            nodes.append(
                _Node(
                    node_id=node, hospital=claimed, epochs=hello.epochs, custodian=hello.custodian
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
        request = SealKeyRequest(epoch=self.epoch, recipients=tuple(recipients))
        replies = self._send(grid, [(node.node_id, request)])
        if not replies:
            raise KeyMismatchError(f"key custodian {self.custodian!r} did not answer the ceremony")
        try:
            sealed = SealKeyReply.from_message(replies[0])
        except MalformedUpdateError as exc:
            self._malformed(node.node_id, exc)
            raise
        if sealed.status is not ReplyStatus.OK:
            assert sealed.code is not None  # every refusal has one
            raise KeyMismatchError(
                f"key custodian {self.custodian!r} refused the ceremony "
                f"[{sealed.code.value}]: {sealed.reason}"
            )
        unasked = sorted(set(sealed.envelopes) - set(recipients))
        if unasked:
            raise KeyMismatchError(
                f"key custodian {self.custodian!r} sealed keys for {unasked}, which were not "
                "asked for; nothing was stored"
            )
        try:
            public = self.keys.save_public(self.epoch, sealed.public_context)
        except SecretKeyExposureError as exc:
            self._audit("secret_key_refused", self.custodian, reason=str(exc))
            raise
        self.keys.save_custodian_cert(self.epoch, sealed.custodian_cert)
        names = list(sealed.envelopes)
        for name, blob in sealed.envelopes.items():
            self.keys.save_envelope(self.epoch, name, blob)
        self._audit(
            "key_epoch_ready", self.custodian, fingerprint=public.fingerprint, sealed_for=names
        )
        return public

    def _install(self, grid: Grid, nodes: list[_Node], public: HeContext) -> set[int]:
        """Relay every pending envelope in one round trip; the nodes that installed it."""
        if not nodes:
            return set()
        requests: list[tuple[int, CeremonyRequest]] = []
        for node in nodes:
            envelope = self.keys.envelope(self.epoch, node.hospital)
            if envelope is None:
                raise StoreError(f"no sealed key for {node.hospital} at epoch {self.epoch}")
            request = InstallKeyRequest(
                epoch=self.epoch,
                envelope=envelope,
                custodian_cert=self.keys.custodian_cert(self.epoch),
                fingerprint=public.fingerprint,
            )
            requests.append((node.node_id, request))
        answered: set[str] = set()
        ok: set[str] = set()
        for reply in self._send(grid, requests):
            try:
                installed = InstallKeyReply.from_message(reply)
            except MalformedUpdateError as exc:
                self._malformed(reply.metadata.src_node_id, exc)
                continue
            hospital = installed.hospital
            answered.add(hospital)
            if installed.status is ReplyStatus.OK and installed.fingerprint == public.fingerprint:
                ok.add(hospital)
                self._audit("key_installed", hospital)
                continue
            if installed.status is ReplyStatus.OK:
                reason = (
                    f"it reports key {installed.fingerprint[:16]}…, not the epoch's "
                    f"{public.fingerprint[:16]}…"
                )
                code = RefusalCode.KEY_MISMATCH.value
            else:
                assert installed.code is not None  # every refusal has one
                reason, code = installed.reason, installed.code.value
            self._audit("key_install_refused", hospital, reason=reason, code=code)
            log.warning(
                "%s did not install the epoch-%d key [%s]: %s", hospital, self.epoch, code, reason
            )
        for node in nodes:
            if node.hospital not in answered:
                self._audit("key_install_refused", node.hospital, reason="no reply")
        # By node and by claimed name: the install reply's "hospital" must be the node's.
        return {node.node_id for node in nodes if node.hospital in ok}
