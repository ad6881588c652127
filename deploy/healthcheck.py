"""Container health check for the fedvault images (``HEALTHCHECK`` and compose).

``python /opt/fedvault/deploy/healthcheck.py coordinator``: healthy once the operator API
named in the coordinator's kit accepts TCP connections. The daemon opens it only
after its SuperLink is healthy and every hospital's node key is enrolled, which is
exactly when hospitals may connect (one that connects earlier is refused once).

``python /opt/fedvault/deploy/healthcheck.py hospital``: healthy while a TLS handshake with
the coordinator's Fleet gateway succeeds, verified against the consortium CA in the
hospital's kit: the one connection a hospital needs, to the party it trusts.

The kit directory comes from ``$FEDVAULT_KIT`` (the images set ``/kit``). Exit 0
when healthy, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from pathlib import Path

from fedvault.errors import FedvaultError
from fedvault.kit import Kit, KitKind

TIMEOUT_S = 4.0


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def check_coordinator(kit_dir: Path) -> str:
    """Connect to the operator API's port; returns what was reached."""
    kit = Kit.load(kit_dir, expected_kind=KitKind.COORDINATOR)
    host, port = _split(kit.operator_api_address)
    with socket.create_connection((host, port), timeout=TIMEOUT_S):
        return f"operator API accepts connections on {host}:{port}"


def check_hospital(kit_dir: Path) -> str:
    """TLS handshake with the Fleet gateway, verified by the consortium CA."""
    kit = Kit.load(kit_dir, expected_kind=KitKind.HOSPITAL)
    host, port = _split(kit.coordinator_address)
    ctx = ssl.create_default_context(cafile=str(kit.ca_path))
    with (
        socket.create_connection((host, port), timeout=TIMEOUT_S) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return f"coordinator {host}:{port} verified ({tls.version()})"


def main(argv: list[str]) -> int:
    """Run the check ``argv[0]`` names; the exit status for Docker."""
    checks = {"coordinator": check_coordinator, "hospital": check_hospital}
    if len(argv) != 1 or argv[0] not in checks:
        print(f"usage: healthcheck.py {'|'.join(checks)}", file=sys.stderr)
        return 2
    kit_dir = Path(os.environ.get("FEDVAULT_KIT", "/kit"))
    try:
        print(checks[argv[0]](kit_dir))
    except (OSError, ValueError, FedvaultError) as exc:  # ssl.SSLError is an OSError
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
