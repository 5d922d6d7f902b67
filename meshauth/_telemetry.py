"""OpenTelemetry instruments and the audit log.

Only ``opentelemetry-api`` is imported: without an SDK every span is a cheap
non-recording span, and attribute work is guarded by ``span.is_recording()``.
Nothing that reaches a span, a metric or a log record may contain a token, a
signature or key material: callers pass names, ids and reason codes only.
"""

from __future__ import annotations

import logging
import re
import time
from time import perf_counter
from typing import Any, Final

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from ._exceptions import MalformedToken, MeshAuthError

__all__ = ["AUDIT_LOGGER", "Telemetry", "audit", "escape_line_breaks", "span_ids"]

AUDIT_LOGGER = logging.getLogger("meshauth.audit")
_VERSION = "0.1.0"
_ACCEPTED: Final = {"meshauth.outcome": "accepted", "meshauth.reason": "ok"}


class Telemetry:
    """The tracer and instruments of one meshauth component."""

    __slots__ = ("_global", "_next_check", "_off", "meter", "tracer", "verify_duration", "verify_outcomes")

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self.tracer = trace.get_tracer("meshauth", _VERSION, tracer_provider=tracer_provider)
        # With no provider given and no SDK installed globally, spans cannot be
        # recorded: hand out the shared invalid span instead of asking the no-op
        # tracer for a new one each time. Whether an SDK was installed since is
        # re-checked at most once a second (the public check reads os.environ).
        self._global = tracer_provider is None
        self._off = False
        self._next_check = 0.0
        self.meter = metrics.get_meter("meshauth", _VERSION, meter_provider=meter_provider)
        self.verify_duration = self.meter.create_histogram(
            "meshauth.verify.duration", unit="s", description="Time to verify one token"
        )
        self.verify_outcomes = self.meter.create_counter(
            "meshauth.verify.outcomes", unit="{token}", description="Token verification decisions"
        )

    def accepted(  # noqa: PLR0917 - positional on purpose: this runs on every verification
        self, span: Span, started: float, caller: str, subject: str, audience: str, kid: str, alg: str
    ) -> None:
        """Close a verify span as accepted and count it (``started``: a ``perf_counter()`` reading)."""
        if span.is_recording():
            span.set_attribute("meshauth.outcome", "accepted")
            span.set_attribute("meshauth.caller", caller)
            span.set_attribute("meshauth.subject", subject)
            span.set_attribute("meshauth.audience", audience)
            span.set_attribute("meshauth.kid", kid)
            span.set_attribute("meshauth.alg", alg)
        span.end()
        self.verify_duration.record(perf_counter() - started, _ACCEPTED)
        self.verify_outcomes.add(1, _ACCEPTED)

    def rejected(
        self, span: Span, error: MeshAuthError, started: float, *, audience: str | None, caller: str | None
    ) -> None:
        """Close a verify span as rejected (status ERROR, reason, error.type) and count it.

        ``caller`` is set only by callers that verified the signature first: an
        unverified name must not reach the trace store.
        """
        mark_rejected(span, error, error.reason)
        if span.is_recording():
            if audience:
                span.set_attribute("meshauth.audience", audience)
            if error.kid:
                span.set_attribute("meshauth.kid", error.kid[:256])
            if caller:
                span.set_attribute("meshauth.caller", caller)
        span.end()
        attributes = {"meshauth.outcome": "rejected", "meshauth.reason": error.reason}
        self.verify_duration.record(perf_counter() - started, attributes)
        self.verify_outcomes.add(1, attributes)

    def start_span(self, name: str) -> Span:
        """Start a meshauth span as a child of the current span (cheap when tracing is off)."""
        if self._global:
            now = time.monotonic()
            if now >= self._next_check:
                self._off = isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
                self._next_check = now + 1.0
            if self._off:
                return _OFF
        return self.tracer.start_span(name)


# Handed out instead of a span while no tracing SDK is installed: it records
# nothing and, for audit records, stands for "use the current span".
_OFF: Final = trace.INVALID_SPAN


def span_ids(span: Span | None = None) -> tuple[str | None, str | None]:
    """Hex trace and span id of ``span`` (or the current span), if valid."""
    context = (span if span is not None and span is not _OFF else trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: a log reader may start a new
# record at any of them, so a user-controlled subject must not contain them raw.
_UNSAFE: Final = {code: f"\\u{code:04x}" for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


def escape_line_breaks(text: str) -> str:
    """``text`` with every control character and line separator written as a ``\\uXXXX`` escape."""
    # Every character _UNSAFE maps is non-printable (Cc, Zl, Zp): printable text is returned as is,
    # without translate's pass over each character.
    return text if text.isprintable() else text.translate(_UNSAFE)


_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id_of(traceparent: str) -> str | None:
    """The trace id of a W3C ``traceparent`` header value, or None if it is not one."""
    match = _TRACEPARENT.fullmatch(traceparent.strip())
    if match is None or match[1] == "0" * 32:
        return None
    return match[1]


def fail_closed(exc: Exception) -> MeshAuthError:
    """The meshauth error to report for ``exc`` raised while judging a token.

    A meshauth error is itself; anything else is a defect or an unforeseen
    input, reported as ``malformed`` (the request is refused) with the
    original as ``__cause__`` and nothing of the token in the message. An
    error without a cause also drops its suppressed context: a
    ``JSONDecodeError`` or ``UnicodeDecodeError`` there holds the decoded token.
    """
    if isinstance(exc, MeshAuthError):
        if exc.__cause__ is None:
            exc.__context__ = None
        return exc
    wrapped = MalformedToken(f"token could not be processed ({type(exc).__name__})")
    wrapped.__cause__ = exc
    return wrapped


def mark_rejected(span: Span, error: BaseException, reason: str, outcome: str = "rejected") -> None:
    """Record a rejection on a meshauth span: outcome, reason, error.type, status ERROR."""
    if span.is_recording():
        span.set_attribute("meshauth.outcome", outcome)
        span.set_attribute("meshauth.reason", reason)
        span.set_attribute("error.type", type(error).__name__)
        # A short description (outcome and reason code), never the message: it may quote request data.
        span.set_status(Status(StatusCode.ERROR, f"{outcome}: {reason}"))


def audit(
    event: str,
    outcome: str,
    reason: str,
    *,
    span: Span | None = None,
    level: int = logging.INFO,
    traceparent: str | None = None,
    **fields: Any,
) -> None:
    """Emit one audit record on the ``meshauth.audit`` logger.

    The record's ``meshauth`` attribute holds the structured fields (see
    DESIGN section 6); the message is a one-line human summary.
    """
    if not AUDIT_LOGGER.isEnabledFor(level):
        return
    trace_id, span_id = span_ids(span)
    if trace_id is None and traceparent:
        # No tracing SDK here, but the caller sent a W3C trace context: keep
        # its trace id so this record joins the rest of the request's trail.
        trace_id = trace_id_of(traceparent)
    record: dict[str, Any] = {
        "event": event,
        "outcome": outcome,
        "reason": reason,
        "caller": None,
        "subject": None,
        "transaction": None,
        "txn_issuer": None,
        "audience": None,
        "kid": None,
        "jti": None,
        "method": None,
        "path": None,
        "client": None,
        "trace_id": trace_id,
        "span_id": span_id,
        "time": time.time(),
    }
    for key, value in fields.items():
        record[key] = list(value) if isinstance(value, tuple) else value
    summary = " ".join(
        f"{key}={escape_line_breaks(str(record[key]))}"
        for key in ("caller", "subject", "audience", "method", "path")
        if record.get(key)
    )
    # Logger.log would walk the stack to find the caller (findCaller) for every record; an audit
    # record's origin is this function, so the record is made and handed to the handlers directly.
    args = (event, outcome, reason, summary)
    entry = AUDIT_LOGGER.makeRecord(
        AUDIT_LOGGER.name, level, __file__, 0, "%s %s: %s %s", args, None, "audit", {"meshauth": record}
    )
    AUDIT_LOGGER.handle(entry)
