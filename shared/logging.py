"""Logging: JSON lines on stdout (pretty text on a TTY), with bound context.

Every line carries the service and, once known, the queue id and peer: they
are bound in a contextvar (`bound(queue_id=...)`), which follows asyncio tasks
and is set per job in worker threads. Decisions and delivery attempts are
logged as one canonical line each through `event()`, Postfix style:
`queue_id=... to=<...> relay=... delay=0.22 dsn=2.0.0 status=sent`.

Never log message bodies, attachment contents or AUTH data.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("smtpgw_log_context", default={})  # noqa: B039 - never mutated, only replaced


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add fields to every log line written inside the block (this thread or task only)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields for the rest of the current context (a task or thread)."""
    _context.set({**_context.get(), **fields})


def event(logger: logging.Logger, message: str, level: int = logging.INFO, **fields: Any) -> None:
    """One canonical decision line: the message plus key=value fields."""
    if logger.isEnabledFor(level):
        # stacklevel=2: where caller information is kept (tests), it names event()'s caller.
        logger.log(level, message, extra={"fields": fields}, stacklevel=2)


_NO_FIELDS: dict[str, Any] = {}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {**_context.get(), **getattr(record, "fields", _NO_FIELDS)}


# One encoder for every line: json.dumps(..., default=str) builds a new JSONEncoder per call.
_encode = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        # (second, "YYYY-MM-DDTHH:MM:SS") of the last line: most lines share their second with the one before.
        # One tuple, replaced whole, so threads formatting at once never pair a second with another's text.
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        line: dict[str, Any] = {
            "ts": f"{text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encode(line)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.name}: {record.getMessage()}"
        text = f"{text} {fields}" if fields else text
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(level: str = "info", fmt: str = "auto", service: str = "") -> None:
    """Configure the root logger once per process."""
    handler = logging.StreamHandler(sys.stdout)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Neither formatter shows the caller's file and line, thread or process: do not compute them for every
    # record (https://docs.python.org/3/howto/logging.html#optimization). This saves a stack walk per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiosmtpd logs every command line at INFO, including MAIL/RCPT addresses: keep it quiet.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    if service:
        bind(service=service)
