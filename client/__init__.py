"""The hospital side.

The ClientApp, local DP-SGD training, site data, policy, keys, the privacy
ledger, the model archive and the hospital daemon.

Imports the shared base and the layers below; never :mod:`fedvault.coordinator`.
"""

from __future__ import annotations

__all__ = [
    "archive",
    "client_app",
    "daemon",
    "data",
    "keys",
    "kit_sites",
    "ledger",
    "masking",
    "node_settings",
    "policy",
    "sent",
    "site",
    "supernode",
    "supernode_entry",
    "training",
]
