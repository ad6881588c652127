"""``python -m fedvault``: the ``fedvault`` command line."""

from fedvault.app.cli import main

main()
