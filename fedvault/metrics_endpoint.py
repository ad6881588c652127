"""A daemon's Prometheus ``/metrics`` endpoint, shared by the coordinator and hospitals.

What a daemon exports comes in two parts: a collector of its own (reading the
round store or the hospital's ledger at scrape time) and what Flower's app
processes (``flwr-serverapp``, ``flwr-clientapp``) recorded in prometheus_client's
multiprocess directory, which the daemon names in its environment before it
starts them. :class:`MetricsEndpoint` serves both with the library's HTTP server.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from fedvault.errors import InvalidConfigError

__all__ = ["MULTIPROC_ENV", "MetricsEndpoint", "prepare_multiprocess_dir", "serve_registry"]

log = logging.getLogger("fedvault.metrics")

#: prometheus_client's multiprocess switch, read when the app process imports it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(path: Path) -> Path:
    """Empty ``path`` and name it in this process's environment for Flower's children.

    Files a previous daemon's app processes left would otherwise be merged into
    this run's counters.
    """
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def serve_registry(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serve ``registry`` on ``http://host:port/metrics``; returns the function that stops it."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise InvalidConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror}); choose a free "
            "--metrics-port, or leave it out to run without metrics"
        ) from exc

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


class MetricsEndpoint:
    """``collector`` plus the app processes' metrics under ``directory``, on ``host:port``.

    Does nothing when ``port`` is ``None`` (metrics off). Call :meth:`prepare`
    before Flower's processes start, :meth:`start` once the daemon serves, and
    :meth:`stop` when it ends.
    """

    def __init__(
        self, collector: Collector, directory: Path, port: int | None, *, host: str = "127.0.0.1"
    ) -> None:
        self.collector, self.directory = collector, Path(directory)
        self.port, self.host = port, host
        self._stop: Callable[[], None] | None = None

    @property
    def url(self) -> str:
        """Where Prometheus scrapes."""
        return f"http://{self.host}:{self.port}/metrics"

    def prepare(self) -> None:
        """Empty the app processes' metrics directory and export it to Flower's children."""
        if self.port is not None:
            prepare_multiprocess_dir(self.directory)

    def start(self) -> None:
        """Serve the collector's and the app processes' metrics."""
        if self.port is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # prepare() may be skipped
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        MultiProcessCollector(registry, path=str(self.directory))
        self._stop = serve_registry(registry, self.host, self.port)
        log.info("metrics on %s", self.url)

    def stop(self) -> None:
        """Stop serving."""
        if self._stop is not None:
            self._stop()
            self._stop = None

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
