"""The gateway's own refusals: meshauth errors whose class carries the HTTP status.

Every refusal the gateway sends is a :class:`~meshauth.MeshAuthError`; its
class says the status and the ``error`` code (``MeshAuthError.status`` and
``.error``), and :func:`meshauth._middleware.default_reply` builds the
response for the gateway and the middlewares alike::

    AccessDenied (403)
    ├── NoRoute                  no_route               404
    └── MethodNotAllowed         method_not_allowed     405 (with Allow)
    UpstreamUnreachable          upstream_unreachable   502
    └── UpstreamTimeout          upstream_timeout       504
"""

from __future__ import annotations

from typing import Any

from .._exceptions import AccessDenied, MeshAuthError

__all__ = ["MethodNotAllowed", "NoRoute", "UpstreamTimeout", "UpstreamUnreachable", "outcome_of"]


class NoRoute(AccessDenied):
    """No route's prefix matches the request path."""

    reason = "no_route"
    status = 404
    error = "not_found"


class MethodNotAllowed(AccessDenied):
    """The route does not take this method; ``allow`` lists the ones it takes."""

    reason = "method_not_allowed"
    status = 405
    error = "method_not_allowed"
    allow: str

    def __init__(self, detail: str, *, allow: str, **fields: Any) -> None:
        self.allow = allow
        super().__init__(detail, **fields)


class UpstreamUnreachable(MeshAuthError):
    """The upstream refused the connection, reset it, or broke the protocol."""

    reason = "upstream_unreachable"
    status = 502
    error = "bad_gateway"


class UpstreamTimeout(UpstreamUnreachable):
    """The upstream did not connect or answer within the route's timeouts."""

    reason = "upstream_timeout"
    status = 504
    error = "gateway_timeout"


def outcome_of(error: MeshAuthError) -> str:
    """The audit outcome of a refusal: ``denied`` (policy), ``rejected`` (the request), or ``error``."""
    if isinstance(error, AccessDenied):
        return "denied"
    return "rejected" if error.status < 500 else "error"
