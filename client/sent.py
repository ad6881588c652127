"""What this hospital has already released: replay, never retrain, the same round.

If the coordinator crashes after a hospital replied, it asks for the same round
again with the same global model. Training again would add fresh noise and
spend privacy a second time — and could push the hospital past its budget just
before the job ends. Releasing the *identical* update again reveals nothing
new, so the hospital keeps each reply it sent, keyed by the exact instruction
(job, round, key epoch, global model bytes), and sends it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from fedvault.durable import atomic_write
from fedvault.messages import ModelPayload, ReplyStatus, RoundInstruction, TrainReply
from fedvault.npz import arrays_from_bytes, arrays_to_bytes

__all__ = ["SentUpdates"]


def _digest(instr: RoundInstruction) -> str:
    h = hashlib.sha256()
    h.update(f"{instr.job.job}\0{instr.server_round}\0{instr.key_epoch}\0".encode())
    if instr.model.envelope is not None:
        h.update(instr.model.envelope)
    else:
        for name, array in (instr.model.arrays or {}).items():
            h.update(name.encode() + b"\0" + str(array.dtype).encode() + str(array.shape).encode())
            h.update(array.tobytes())
    return h.hexdigest()


class SentUpdates:
    """Replies already released, under ``state_dir/sent/``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "sent"

    def _paths(self, instr: RoundInstruction) -> tuple[Path, Path]:
        base = self.root / instr.job.job / f"round-{instr.server_round}" / _digest(instr)
        return base.with_suffix(".json"), base.with_suffix(".update")

    def get(self, instr: RoundInstruction) -> TrainReply | None:
        """The reply already released for ``instr``, or ``None`` if there is none."""
        meta_path, blob_path = self._paths(instr)
        if not (meta_path.exists() and blob_path.exists()):
            return None
        meta = json.loads(meta_path.read_text())
        blob = blob_path.read_bytes()
        if meta.pop("payload") == "envelope":
            update = ModelPayload(envelope=blob)
        else:
            update = ModelPayload(arrays=arrays_from_bytes(blob))
        meta["status"] = ReplyStatus(meta["status"])
        return TrainReply(update=update, **meta)

    def put(self, instr: RoundInstruction, reply: TrainReply) -> None:
        """Keep a successful ``reply`` to ``instr`` durably; refusals are not kept."""
        if reply.status is not ReplyStatus.OK or reply.update is None:
            return
        meta_path, blob_path = self._paths(instr)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        if reply.update.envelope is not None:
            blob, kind = reply.update.envelope, "envelope"
        else:
            blob, kind = arrays_to_bytes(reply.update.arrays or {}), "arrays"
        meta = {
            f.name: getattr(reply, f.name) for f in dataclasses.fields(reply) if f.name != "update"
        }
        meta["status"] = reply.status.value
        meta["payload"] = kind
        # The update first, the metadata last: a crash between them leaves no usable
        # entry, and each file is durable before the next (see fedvault.durable).
        atomic_write(blob_path, blob)
        atomic_write(meta_path, json.dumps(meta))
