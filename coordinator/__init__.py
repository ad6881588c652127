"""The coordinator side.

The ServerApp and round loop, aggregation, the round store, the key ceremony,
the operator API and the coordinator daemon.

Imports the shared base and the layers below; never :mod:`fedvault.client`.
"""

from __future__ import annotations

__all__ = [
    "aggregation",
    "at_rest",
    "daemon",
    "fleet_gateway",
    "key_ceremony",
    "operator_api",
    "records",
    "report",
    "round_events",
    "run_settings",
    "server_app",
    "store",
    "store_engine",
    "store_models",
    "strategy",
    "superlink",
    "tracking",
]
