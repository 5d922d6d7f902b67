"""Telemetry of JWKS fetches: the ``meshauth.jwks.fetch`` span, fetch metrics, audit and log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import httpx
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ._jwks_cache import Flight, KeyCache, Outcome
from ._jwks_http import Fetched, FetchFailed, NotModified
from ._keyset import KeySet
from ._telemetry import Telemetry, audit

__all__ = ["FetchTelemetry"]

logger = logging.getLogger("meshauth")


class FetchTelemetry:
    """The ``meshauth.jwks.fetch`` span, the fetch metrics and the audit/log lines of each fetch."""

    def __init__(self, cache: KeyCache, url: httpx.URL, telemetry: Telemetry) -> None:
        self.cache = cache
        self.source = cache.source
        self.host = url.host
        self.port = url.port
        self.tracer = telemetry.tracer
        self.counter = telemetry.meter.create_counter(
            "meshauth.jwks.fetches", unit="{fetch}", description="JWKS fetches by outcome and reason"
        )
        self.duration = telemetry.meter.create_histogram(
            "meshauth.jwks.fetch.duration", unit="s", description="Time to fetch the JWKS, retries included"
        )
        self.logged_error: str | None = None
        # Read at collection time only: costs nothing on the verify path.
        telemetry.meter.create_observable_gauge(
            "meshauth.jwks.age",
            callbacks=[self._observe_age],
            unit="s",
            description="Age of the key set in service (time since its last good fetch)",
        )

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        snapshot = self.cache.snapshot
        if snapshot is not None:
            yield Observation(self.cache.monotonic() - snapshot.good_at, {"server.address": self.host})

    def begin(self, flight: Flight) -> tuple[Span, float]:
        attributes: dict[str, str | int] = {"server.address": self.host, "meshauth.jwks.trigger": flight.trigger}
        if self.port is not None:
            attributes["server.port"] = self.port
        span = self.tracer.start_span("meshauth.jwks.fetch", kind=SpanKind.CLIENT, attributes=attributes)
        return span, time.perf_counter()

    def record(self, result: Outcome | None, span: Span, started: float, changed: bool) -> None:
        status: int | None = None
        if isinstance(result, Fetched | NotModified):
            outcome, reason, status = "accepted", ("ok" if changed else "not_modified"), result.status
        else:
            outcome, reason = "rejected", (result.reason if result is not None else "aborted")
            status = result.status if result is not None else None
        snapshot = self.cache.snapshot
        if span.is_recording():
            span.set_attribute("meshauth.outcome", outcome)
            span.set_attribute("meshauth.reason", reason)
            if status is not None:
                span.set_attribute("http.response.status_code", status)
            if snapshot is not None:
                span.set_attribute("meshauth.jwks.keys", len(snapshot.keys))
            if outcome == "rejected":
                span.set_attribute("error.type", reason)
                span.set_status(Status(StatusCode.ERROR, f"rejected: {reason}"))
        span.end()
        attributes = {"meshauth.outcome": outcome, "meshauth.reason": reason}
        self.counter.add(1, attributes)
        self.duration.record(time.perf_counter() - started, attributes)
        if isinstance(result, FetchFailed):
            self._failed(result, span, snapshot is not None)
        elif changed and snapshot is not None:
            self._loaded(snapshot.keys, span)

    def _failed(self, result: FetchFailed, span: Span, have_set: bool) -> None:
        source = self.source
        message = self.cache.last_error
        if message != self.logged_error:
            keeping = "keeping the last good set" if have_set else "no key set yet"
            logger.warning("meshauth registry %s: fetch failed, %s: %s", source, keeping, message)
        self.logged_error = message
        audit(
            "jwks.refresh",
            "rejected",
            result.reason,
            span=span,
            level=logging.WARNING,
            source=source,
            detail=result.detail,
        )

    def _loaded(self, keys: KeySet, span: Span) -> None:
        self.logged_error = None
        source = self.source
        problems = len(keys.problems)
        audit("jwks.refresh", "accepted", "ok", span=span, source=source, keys=len(keys))
        logger.info(
            "meshauth registry %s: loaded %d keys%s", source, len(keys), f" ({problems} skipped)" if problems else ""
        )
