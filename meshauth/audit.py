"""The audit log: one structured record per authentication or authorization decision.

meshauth writes audit records to the standard-library logger ``meshauth.audit``
at INFO level; each record carries its fields as ``record.meshauth`` (a dict:
event, outcome, reason, caller, subject, transaction, txn_issuer, audience, kid, jti, method,
path, client, trace_id, span_id, time). Nothing is emitted unless the logger is
enabled, so the audit log costs nothing when unused.

To write JSON lines to a file (or stderr):

>>> import io, logging, meshauth.audit
>>> stream = io.StringIO()
>>> handler = meshauth.audit.configure(stream)
>>> meshauth.audit.AUDIT_LOGGER.info("demo", extra={"meshauth": {"event": "verify", "outcome": "accepted"}})
>>> '"outcome": "accepted"' in stream.getvalue()
True
>>> meshauth.audit.AUDIT_LOGGER.removeHandler(handler)
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import sys
from typing import IO, Any, Final

from ._telemetry import AUDIT_LOGGER, escape_line_breaks

__all__ = ["AUDIT_LOGGER", "JsonFormatter", "JsonLinesHandler", "configure"]

# One encoder for every record (json.dumps with options builds a new one per call).
_ENCODER: Final = json.JSONEncoder(default=str, ensure_ascii=False, separators=(", ", ": "))


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line.

    The object holds the record's ``meshauth`` fields (when present), plus
    ``level``, ``logger``, ``message`` and an ISO-8601 ``timestamp``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._prefix = ""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "timestamp": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "meshauth", None)
        if isinstance(extra, dict):
            fields.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            fields["exception"] = record.exc_info[0].__name__
        text: str = _ENCODER.encode(fields)
        # The encoder escapes C0 controls but keeps DEL, C1 controls and U+2028/U+2029 raw (valid JSON,
        # yet a line break to many log readers); they become \\u escapes, which decode to the same text.
        # An ASCII line can only hold DEL of them.
        if text.isascii() and "\x7f" not in text:
            return text
        return escape_line_breaks(text)

    def _timestamp(self, created: float) -> str:
        """``datetime.fromtimestamp(created, UTC).isoformat()``, with the date and time part kept per second."""
        second = int(created)
        micro = round((created - second) * 1_000_000)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:
            moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
            self._second, self._prefix = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{micro:06d}+00:00" if micro else f"{self._prefix}+00:00"


class JsonLinesHandler(logging.Handler):
    """Writes formatted records as lines to a file (opened for appending) or a text stream.

    A line is never split between two writes, so processes appending to one
    file (a gateway's workers) cannot interleave inside a line. Each line is
    written as it is emitted; with ``batch=True``, inside a running asyncio
    event loop, the lines of one pass of the loop are written together, in
    one write, as soon as that pass is over (a busy gateway writes tens of
    records per pass, each after its response). ``flush()`` and ``close()``
    write whatever is pending.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[str], *, batch: bool = False) -> None:
        super().__init__()
        self._path: str | None = None
        self._fd: int | None = None
        self._stream: IO[str] | None = None
        if isinstance(target, str | os.PathLike):
            self._path = os.fspath(target)
            self._fd = self._open(self._path)
        else:
            self._stream = target
        self._batch = batch
        self._pending: list[str] = []
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if not self._batch:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_on is not loop:
            self._flush_on = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock or _NO_LOCK:
            self._flush_on = None
            if not self._pending:
                return
            data = "\n".join(self._pending) + "\n"
            self._pending.clear()
            try:
                if self._path is not None:
                    if self._fd is None:  # closed (logging.shutdown, a dictConfig): reopened, as FileHandler does
                        self._fd = self._open(self._path)
                    _write_all(self._fd, data.encode("utf-8"))
                elif self._stream is not None:
                    self._stream.write(data)
                    self._stream.flush()
            except (OSError, ValueError):
                self.handleError(logging.makeLogRecord({"msg": "meshauth audit log: a write failed"}))

    @staticmethod
    def _open(path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def close(self) -> None:
        self.flush()
        with self.lock or _NO_LOCK:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None


_NO_LOCK: Final = _NoLock()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def configure(
    target: str | os.PathLike[str] | IO[str] | None = None, *, level: int = logging.INFO, batch: bool = False
) -> logging.Handler:
    """Send ``meshauth.audit`` records as JSON lines to a file path or stream (default stderr).

    With ``batch=True``, records emitted during one pass of a running asyncio
    event loop are written together when the pass is over (one system call
    instead of one per record; see :class:`JsonLinesHandler`). Returns the
    handler so callers can remove it again.
    """
    handler = JsonLinesHandler(sys.stderr if target is None else target, batch=batch)
    handler.setFormatter(JsonFormatter())
    AUDIT_LOGGER.addHandler(handler)
    if AUDIT_LOGGER.level == logging.NOTSET or AUDIT_LOGGER.level > level:
        AUDIT_LOGGER.setLevel(level)
    return handler
