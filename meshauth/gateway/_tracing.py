"""Trace context for every request, with or without an OpenTelemetry SDK.

The gateway continues an incoming W3C ``traceparent`` or starts a trace, so
that the audit record and the upstream call always carry a trace id. With an
SDK configured, the real spans' ids are used and the global propagator
injects the outbound headers; without one, the gateway writes
``traceparent`` itself, with a fresh span id for its own hop.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags

__all__ = ["RequestTrace", "inject", "start_trace"]

_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_MAX_TRACESTATE: Final = 512


@dataclasses.dataclass(slots=True)
class RequestTrace:
    """The trace of one request through the gateway."""

    trace_id: str
    """32 lower-case hex digits."""
    hop_id: str
    """A span id of the gateway's own, used when no SDK span exists."""
    flags: str
    tracestate: str | None
    context: Context
    """The parent context for the gateway's spans (the caller's span, or a synthetic root)."""
    parent_span_id: int

    def traceparent(self, span_id: str | None = None) -> bytes:
        """A ``traceparent`` value naming ``span_id`` (default: the hop id) as the parent."""
        return f"00-{self.trace_id}-{span_id or self.hop_id}-{self.flags}".encode("ascii")


_FIELDS: dict[int, frozenset[bytes]] = {}


def _propagator_fields() -> frozenset[bytes]:
    """The header names the global propagator reads, as lower-case bytes (cached per propagator)."""
    propagator = propagate.get_global_textmap()
    fields = _FIELDS.get(id(propagator))
    if fields is None:
        try:
            names = propagator.fields
        except Exception:  # a propagator that cannot say: fall back to W3C and baggage
            names = {"traceparent", "tracestate", "baggage"}
        fields = frozenset(name.lower().encode("latin-1") for name in names) | {b"traceparent", b"tracestate"}
        _FIELDS.clear()
        _FIELDS[id(propagator)] = fields
    return fields


def _random_id(size: int) -> str:
    # Trace and span ids are unique, not secret: the random module (as the OpenTelemetry SDK's id
    # generator uses) saves a getrandom system call per id; it is reseeded in forked workers.
    while True:
        value = random.getrandbits(size * 8)
        if value:  # all-zero ids are invalid (W3C trace context)
            return format(value, f"0{size * 2}x")


def _context_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The trace context the global propagator reads from these headers (empty when there is none)."""
    # Only the headers the configured propagator reads (W3C by default):
    # decoding every header of every request would cost more than the rest.
    fields = _propagator_fields()
    carrier: dict[str, list[str]] = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in fields:
            carrier.setdefault(lowered.decode("latin-1"), []).append(value.decode("latin-1"))
    if len(carrier.get("traceparent", ())) > 1:
        del carrier["traceparent"]
        carrier.pop("tracestate", None)
    if not carrier:
        return Context()
    try:
        return propagate.extract(carrier)
    except Exception:
        # A third-party propagator choking on hostile headers must not
        # fail the request: start a new trace instead.
        return Context()


def start_trace(headers: Iterable[tuple[bytes, bytes]]) -> RequestTrace:
    """The trace of a request with these (lower-case) ASGI headers.

    An OpenTelemetry server span already current (ASGI instrumentation in
    front of the gateway) is the parent; otherwise the context comes from the
    headers through the global propagator. A request that carries several
    ``traceparent`` headers starts a new trace (W3C: such a header is invalid).
    """
    hop_id = _random_id(8)
    current = trace.get_current_span().get_span_context()
    if current.is_valid:
        ctx = otel_context.get_current()
        parent = current
    else:
        ctx = _context_from_headers(headers)
        parent = trace.get_current_span(ctx).get_span_context()
    if parent.is_valid:
        tracestate = parent.trace_state.to_header() or None
        if tracestate is not None and len(tracestate) > _MAX_TRACESTATE:
            tracestate = None
        return RequestTrace(
            trace_id=format(parent.trace_id, "032x"),
            hop_id=hop_id,
            flags=format(int(parent.trace_flags), "02x"),
            tracestate=tracestate,
            context=ctx,
            parent_span_id=parent.span_id,
        )
    # A new trace. The synthetic remote parent makes SDK spans (verify,
    # authorize, the upstream call) join this trace id instead of each
    # starting their own; it is marked sampled so that upstream services with
    # a parent-based sampler record their part.
    trace_id = _random_id(16)
    synthetic = SpanContext(int(trace_id, 16), int(hop_id, 16), is_remote=True, trace_flags=_SAMPLED)
    return RequestTrace(
        trace_id=trace_id,
        hop_id=hop_id,
        flags="01",
        tracestate=None,
        context=trace.set_span_in_context(NonRecordingSpan(synthetic), ctx),
        parent_span_id=synthetic.span_id,
    )


def is_sdk_span(span: Span, request_trace: RequestTrace) -> bool:
    """Whether ``span`` is a span of its own (an SDK made it), not the parent handed back."""
    context = span.get_span_context()
    return context.is_valid and context.span_id != request_trace.parent_span_id


def inject(span: Span, request_trace: RequestTrace) -> list[tuple[bytes, bytes]]:
    """Outbound trace headers for a call made inside ``span``."""
    if is_sdk_span(span, request_trace):
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span, request_trace.context))
        return [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in carrier.items()]
    headers = [(b"traceparent", request_trace.traceparent())]
    if request_trace.tracestate:
        headers.append((b"tracestate", request_trace.tracestate.encode("latin-1")))
    return headers
