"""Log setup for the daemons: one plain line or one JSON object per record.

A daemon's stderr usually goes to a file (``fedvault demo``, systemd, a
container's log driver), so records are written unwrapped and without colour
unless stderr is a terminal::

    2026-12-05T21:30:00Z INFO fedvault.coordinator job=J round=3 committed: ...

``--log-format json`` writes one object per line with ``ts``, ``level``,
``logger`` and ``message``, plus ``job``, ``round`` and ``hospital`` when the
record carries them (``extra=`` or a :func:`context_logger`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import IO, Any, Literal

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

from fedvault.errors import InvalidConfigError

__all__ = [
    "CONTEXT_FIELDS",
    "LOG_FORMATS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "context_logger",
]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

#: Record attributes that say which job, round and hospital a line is about.
CONTEXT_FIELDS = ("job", "round", "hospital")

#: Loggers that speak at INFO on every poll (the daemon's 3-second run-status
#: request, migrations checked on each store opening): DEBUG-only detail.
_CHATTY = ("httpx", "httpcore", "alembic.runtime.migration", "flwr")


def _utc(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))


class TextFormatter(logging.Formatter):
    """``TS LEVEL LOGGER [job=J] [round=N] [hospital=H] MESSAGE`` on one line (UTC)."""

    def format(self, record: logging.LogRecord) -> str:
        """Format ``record``; a traceback, if any, follows on its own lines."""
        context = " ".join(
            f"{name}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        )
        head = f"{_utc(record.created)} {record.levelname} {record.name}"
        line = (
            f"{head} {context} {record.getMessage()}"
            if context
            else (f"{head} {record.getMessage()}")
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(_JsonFormatter):
    """One JSON object per record: ts, level, logger, message, and job/round/hospital."""

    def __init__(self) -> None:
        super().__init__(
            "%(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            reserved_attrs=(),
            json_ensure_ascii=False,
        )

    def add_fields(
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        """Keep the stable keys only: a record's other attributes are Python internals."""
        log_data["ts"] = _utc(record.created)
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.getMessage()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                log_data[name] = value
        if record.exc_info:
            log_data["exc_info"] = self.formatException(record.exc_info)
        log_data.update(message_dict)


class _ContextAdapter(logging.LoggerAdapter[logging.Logger]):
    """Adds fixed context (job, hospital) to every record; a call's ``extra`` adds more."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def context_logger(
    logger: logging.Logger | str, **context: object
) -> logging.LoggerAdapter[logging.Logger]:
    """``logger`` with ``context`` (e.g. ``job=``, ``hospital=``) on every record."""
    base = logging.getLogger(logger) if isinstance(logger, str) else logger
    fixed: Mapping[str, object] = {k: v for k, v in context.items() if v is not None}
    return _ContextAdapter(base, dict(fixed))


class _Defaults(logging.Filter):
    """Gives every record the daemon-wide context it does not carry itself."""

    def __init__(self, context: Mapping[str, object]) -> None:
        super().__init__()
        self.context = dict(context)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.context.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def configure_logging(
    log_format: str = "text",
    *,
    level: int = logging.INFO,
    stream: IO[str] | None = None,
    context: Mapping[str, object] | None = None,
) -> logging.Handler:
    """Send every record at ``level`` or above to ``stream`` (stderr) in ``log_format``.

    Text on a terminal is rich's (colour, wrapped); anywhere else it is one plain
    line per record. The loggers in :data:`_CHATTY` speak only from WARNING unless
    ``level`` is DEBUG. ``context`` (e.g. a hospital daemon's ``hospital``) goes on
    every record that has no value of its own. Returns the handler installed on
    the root logger, which replaces any handler there.

    Raises
    ------
    InvalidConfigError
        ``log_format`` is neither ``text`` nor ``json``.
    """
    if log_format not in LOG_FORMATS:
        raise InvalidConfigError(
            f"--log-format {log_format!r} is not one of {', '.join(LOG_FORMATS)}"
        )
    out = stream if stream is not None else sys.stderr
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(out)
        handler.setFormatter(JsonFormatter())
    elif out.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        handler = RichHandler(console=Console(file=out), show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(TextFormatter())
    if context:
        handler.addFilter(_Defaults({k: v for k, v in context.items() if v is not None}))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)
    return handler
