"""``flower-supernode``, but a SuperNode whose Fleet connection ended exits.

Flower 1.41's SuperNode ends its message loop on any error its retry policy
does not retry (an HTTP 500 from the SuperLink, e.g. "database is locked" under
load): it logs the error, deactivates the node and returns from
``flower_supernode()``. The process stays alive, held by its Runtime API server
thread, but never polls again, so the hospital silently drops out of every
later round and a supervisor that waits for the process to exit never restarts
it (seen in the 100-hospital soak). Run through this module, the process exits
with :data:`CONNECTION_ENDED` instead, and the hospital daemon restarts it with
its usual backoff.

Arguments are ``flower-supernode``'s, unchanged.
"""

from __future__ import annotations

import os
import sys

__all__ = ["CONNECTION_ENDED", "CONNECTION_ENDED_TEXT", "main"]

CONNECTION_ENDED = 75  # EX_TEMPFAIL: try again later
CONNECTION_ENDED_TEXT = "the SuperNode's connection to the SuperLink ended"


def main() -> None:
    """Run ``flower-supernode``; exit with :data:`CONNECTION_ENDED` when its loop ends."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    flower_supernode()  # returns only when the message loop has ended
    sys.stdout.write(
        f"fedvault: {CONNECTION_ENDED_TEXT} (the error above); exiting with code "
        f"{CONNECTION_ENDED} so the hospital daemon restarts it\n"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: the Runtime API server's thread would otherwise keep the process up.
    os._exit(CONNECTION_ENDED)


if __name__ == "__main__":
    main()
