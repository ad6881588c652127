"""fedvault: federated learning for hospital consortia.

DP-SGD at every hospital (Opacus), BFV-encrypted aggregation at a coordinator
that holds no secret key (TenSEAL), durable round state (SQLAlchemy), Flower
for transport, the round lifecycle and simulation.
"""

from __future__ import annotations

import os

# Offline operation: hospitals' machines must not phone home. Flower reads these
# when it sends telemetry or checks for updates, so set them before it runs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

__version__ = "0.1.0"
__all__ = ["__version__"]
