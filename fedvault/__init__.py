"""fedvault: federated learning for hospital consortia.

DP-SGD at every hospital (Opacus), BFV-encrypted aggregation at a coordinator
that holds no secret key (TenSEAL), durable round state (SQLAlchemy), Flower
for transport, the round lifecycle and simulation.

The layers, from the bottom (``tests/test_layers.py`` holds them):

1. :mod:`fedvault.errors` and :mod:`fedvault.durable`: the exception tree and
   the durable file writer, standard library only.
2. :mod:`fedvault.proto`: wire formats.
3. :mod:`fedvault.privacy`: DP-SGD, BFV encryption, certificates and sealing.
4. The shared base, the plain modules of this package: job configuration,
   messages, kits, the Flower environment, tasks and their fingerprints,
   metrics, partitioning, serialisation helpers.
5. :mod:`fedvault.coordinator` and :mod:`fedvault.client`, which never import
   each other.
6. :mod:`fedvault.app`: the command line, demo, simulation, provisioning,
   status and export.
7. :mod:`fedvault.examples`: tasks, loaded by name through entry points.
"""

from __future__ import annotations

import os

# Offline operation: hospitals' machines must not phone home. Flower reads these
# when it sends telemetry or checks for updates, so set them before it runs.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

__version__ = "0.1.0"
__all__ = ["__version__"]
