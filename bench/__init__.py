"""fedvault benchmarks: ``python -m bench.run`` (``make bench``); not part of ``make test``."""
