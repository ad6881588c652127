"""``make bench`` section ``lora``: federated LoRA fine-tuning under DP + HE.

``text-lora`` (LoRA adapters and a head on a frozen MiniLM encoder; only they
travel) against ``text-frozen-head`` (the same frozen encoder, a linear head),
3 hospitals, the same ε, data and seed, through the full pipeline
(``fedvault simulate``: Flower, DP-SGD, BFV). The jobs and their measurement
live with the other large-model jobs in :mod:`bench.big_model`.
"""

from __future__ import annotations

from bench.big_model import run_lora as run

__all__ = ["run"]
