"""The privacy layer, below everything but the wire formats.

DP-SGD planning and accounting (Opacus), BFV encryption and its packing,
certificates and key sealing, and SecAgg+ masking inside the encryption.

Imports only :mod:`fedvault.errors` and :mod:`fedvault.proto`.
"""

from __future__ import annotations

__all__ = [
    "audit",
    "dp",
    "fixed_point",
    "he",
    "he_context",
    "packing",
    "pki",
    "seal_bytes",
    "sealing",
    "secagg",
    "secagg_he",
    "secagg_messages",
    "secagg_prg",
]
