"""The ``workers``, ``[limits]`` and ``[telemetry]`` settings of the gateway (DESIGN section 8).

They shape the server in front of the gateway application rather than the
application itself, so they live apart from routes and issuers; the
configuration loader calls :func:`parse_limits`, :func:`parse_telemetry` and
:func:`parse_workers` with its own error reporting.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, Final, NoReturn
from urllib.parse import urlsplit

__all__ = ["Limits", "TelemetrySettings", "parse_limits", "parse_telemetry", "parse_workers"]

_MAX_WORKERS: Final = 64
_LIMIT_KEYS: Final = (
    "body_timeout",
    "header_timeout",
    "idle_timeout",
    "max_body_bytes",
    "max_connections",
    "max_header_bytes",
)
_TELEMETRY_KEYS: Final = ("otlp_endpoint", "service_name")

Fail = Callable[[str, str], NoReturn]


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one client connection may cost the gateway (the ``[limits]`` table).

    >>> Limits().header_timeout
    10.0
    """

    header_timeout: float = 10.0
    """Seconds for the whole request head, from the first byte (or from accept); then the connection is closed."""
    idle_timeout: float = 5.0
    """Seconds a keep-alive connection may wait for its next request."""
    body_timeout: float = 30.0
    """Seconds the request body may make no progress."""
    max_connections: int = 1000
    """Open client connections per worker; beyond, a new connection gets 503 and is closed."""
    max_header_bytes: int = 16384
    """Size of the request line plus headers; beyond, 431."""
    max_body_bytes: int = 10485760
    """Size of a request body; beyond, 413."""


@dataclasses.dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """Span and metric export (the ``[telemetry]`` table); ``OTEL_*`` variables are read at start."""

    otlp_endpoint: str | None = None
    """Base URL of an OTLP/HTTP collector (``/v1/traces`` and ``/v1/metrics`` are appended)."""
    service_name: str | None = None
    """The ``service.name`` resource attribute (default: ``OTEL_SERVICE_NAME``, else the gateway's service)."""


def _number(value: object, where: str, fail: Fail, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        fail(where, f"expected a number, found {type(value).__name__}")
    if not low < value <= high:
        fail(where, f"expected a number of seconds above {low:g} and up to {high:g}, found {value:g}")
    return float(value)


def _integer(value: object, where: str, fail: Fail, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        fail(where, f"expected an integer, found {type(value).__name__}")
    if not low <= value <= high:
        fail(where, f"expected an integer from {low} to {high}, found {value}")
    return value


def _table(value: object, where: str, allowed: tuple[str, ...], fail: Fail) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        fail(where, f"expected a [{where}] table, found {type(value).__name__}")
    for key in value:
        if key not in allowed:
            fail(f"{where}.{key}", f"unknown key (expected one of {', '.join(allowed)})")
    return value


def parse_limits(value: object, fail: Fail) -> Limits:
    """The ``[limits]`` table, every key optional (defaults as in :class:`Limits`)."""
    table = _table(value, "limits", _LIMIT_KEYS, fail)
    default = Limits()
    seconds = {
        key: _number(table.get(key, getattr(default, key)), f"limits.{key}", fail, low=0.0, high=3600.0)
        for key in ("header_timeout", "idle_timeout", "body_timeout")
    }
    return Limits(
        **seconds,
        max_connections=_integer(
            table.get("max_connections", default.max_connections), "limits.max_connections", fail, low=1, high=1000000
        ),
        max_header_bytes=_integer(
            table.get("max_header_bytes", default.max_header_bytes),
            "limits.max_header_bytes",
            fail,
            low=1024,
            high=1048576,
        ),
        max_body_bytes=_integer(
            table.get("max_body_bytes", default.max_body_bytes), "limits.max_body_bytes", fail, low=0, high=2**40
        ),
    )


def parse_telemetry(value: object, fail: Fail) -> TelemetrySettings:
    """The ``[telemetry]`` table: an ``http(s)`` collector URL and a service name, both optional."""
    table = _table(value, "telemetry", _TELEMETRY_KEYS, fail)
    endpoint = table.get("otlp_endpoint")
    if endpoint is not None:
        parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            fail("telemetry.otlp_endpoint", "expected an http(s) URL such as 'http://127.0.0.1:4318'")
    name = table.get("service_name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        fail("telemetry.service_name", "expected a non-empty string")
    return TelemetrySettings(otlp_endpoint=endpoint, service_name=name)


def parse_workers(value: object, fail: Fail) -> int:
    """``workers``: the number of processes serving the one port."""
    return _integer(value, "workers", fail, low=1, high=_MAX_WORKERS)
