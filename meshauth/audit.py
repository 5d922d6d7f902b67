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

import datetime
import json
import logging
import os
import sys
from typing import IO, Any

from ._telemetry import AUDIT_LOGGER, escape_line_breaks

__all__ = ["AUDIT_LOGGER", "JsonFormatter", "configure"]


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object on one line.

    The object holds the record's ``meshauth`` fields (when present), plus
    ``level``, ``logger``, ``message`` and an ISO-8601 ``timestamp``.
    """

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "meshauth", None)
        if isinstance(extra, dict):
            fields.update(extra)
        if record.exc_info and record.exc_info[0] is not None:
            fields["exception"] = record.exc_info[0].__name__
        # json.dumps escapes C0 controls but keeps DEL, C1 controls and U+2028/U+2029 raw (valid JSON,
        # yet a line break to many log readers); they become \\u escapes, which decode to the same text.
        text = json.dumps(fields, default=str, ensure_ascii=False, separators=(", ", ": "))
        return escape_line_breaks(text)


def configure(target: str | os.PathLike[str] | IO[str] | None = None, *, level: int = logging.INFO) -> logging.Handler:
    """Send ``meshauth.audit`` records as JSON lines to a file path or stream (default stderr).

    Returns the handler so callers can remove it again.
    """
    handler: logging.Handler
    if target is None:
        handler = logging.StreamHandler(sys.stderr)
    elif isinstance(target, str | os.PathLike):
        handler = logging.FileHandler(os.fspath(target), encoding="utf-8")
    else:
        handler = logging.StreamHandler(target)
    handler.setFormatter(JsonFormatter())
    AUDIT_LOGGER.addHandler(handler)
    if AUDIT_LOGGER.level == logging.NOTSET or AUDIT_LOGGER.level > level:
        AUDIT_LOGGER.setLevel(level)
    return handler
