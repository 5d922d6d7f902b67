"""Mutual authentication: proving which service answered a request.

The caller sends a fresh random ``Meshauth-Nonce`` with each request; the
callee answers with a ``Meshauth-Response`` token (``typ``
``meshauth-response+jwt``) signed with its own key, addressed to the caller
and bound to that nonce. :class:`ResponseVerifier` checks it.
"""

from __future__ import annotations

import contextlib
import contextvars
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from opentelemetry import metrics, trace

from ._exceptions import InvalidClaim, IssuerMismatch, MeshAuthError, ResponseAuthError
from ._principal import Principal
from ._registry import KeySource
from ._replay import MemoryReplayCache
from ._verify import RESPONSE_TOKEN_TYPE, Verifier

__all__ = ["NONCE_HEADER", "RESPONSE_HEADER", "ResponseVerifier", "new_nonce"]

NONCE_HEADER: Final = "Meshauth-Nonce"
RESPONSE_HEADER: Final = "Meshauth-Response"
MAX_RESPONSE_LIFETIME: Final = 60

# (expected responder, nonce) of the response being verified; a context
# variable keeps concurrent threads and tasks apart.
_EXPECTED: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("meshauth_expected_response")


def _present(token: str | None, service: str) -> str:
    """The response token, or ``missing_response`` when the response carried none."""
    if not token:
        raise ResponseAuthError(
            f"no {RESPONSE_HEADER} header in the response from {service!r}: "
            "did the callee's middleware get identity=? (it signs responses only with one)",
            reason="missing_response",
            expected=service,
            actual="nothing",
        )
    return token


@contextlib.contextmanager
def _expecting(service: str, nonce: str) -> Iterator[None]:
    """Verify a response token inside: its responder and nonce are set, any failure is a ResponseAuthError."""
    reset = _EXPECTED.set((service, nonce))
    try:
        yield
    except MeshAuthError as exc:
        raise ResponseAuthError(
            f"response could not be authenticated: {exc.detail}",
            reason=exc.reason,
            expected=exc.expected,
            actual=exc.actual,
            kid=exc.kid,
        ) from exc
    finally:
        _EXPECTED.reset(reset)


def new_nonce() -> str:
    """A fresh request nonce (128 random bits, base64url)."""
    return secrets.token_urlsafe(16)


class ResponseVerifier(Verifier):
    """Verifies response tokens addressed to ``caller`` (this service).

    >>> from meshauth.testing import Mesh
    >>> mesh = Mesh(["orders", "payments"])
    >>> nonce = ResponseVerifier.new_nonce()  # sent as the request's Meshauth-Nonce
    >>> answer = mesh.identity("payments").mint_response("orders", nonce)
    >>> checker = ResponseVerifier("orders", mesh.keys, clock=mesh.clock)
    >>> checker.verify_response(answer, service="payments", nonce=nonce).caller
    'payments'
    """

    token_type = RESPONSE_TOKEN_TYPE
    span_name = "meshauth.response.verify"
    new_nonce = staticmethod(new_nonce)
    """A fresh ``Meshauth-Nonce`` for a request whose response will be checked (128 random bits)."""

    def __init__(
        self,
        caller: str,
        keys: KeySource,
        *,
        leeway: float = 30,
        clock: Callable[[], float] = time.time,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        # Every response token is unique (its nonce), so there is nothing to cache; but an
        # accepted one is remembered for its lifetime, so a client that reuses a nonce
        # cannot be shown an old answer twice.
        super().__init__(
            caller,
            keys,
            leeway=leeway,
            max_lifetime=MAX_RESPONSE_LIFETIME,
            clock=clock,
            cache_size=0,
            max_actors=0,
            replay_cache=MemoryReplayCache(max_entries=200_000, grace=leeway, clock=clock),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )

    def verify_response(self, token: str | None, *, service: str, nonce: str) -> Principal:
        """Check that ``token`` proves ``service`` answered the request carrying ``nonce``.

        Raises:
            ResponseAuthError: with ``reason`` ``missing_response``,
                ``wrong_responder``, ``nonce_mismatch`` or the token's own
                rejection reason (``bad_signature``, ``expired``, ...).
        """
        token = _present(token, service)
        with _expecting(service, nonce):
            return self.verify(token)

    async def averify_response(self, token: str | None, *, service: str, nonce: str) -> Principal:
        """Async form of :meth:`verify_response` (for async key sources)."""
        token = _present(token, service)
        with _expecting(service, nonce):
            return await self.averify(token)

    def _check_extra_claims(self, claims: dict[str, Any]) -> None:
        expected = _EXPECTED.get(None)
        if expected is None:
            raise InvalidClaim("response tokens are checked with verify_response()", reason="invalid_claim")
        service, nonce = expected
        if claims["iss"] != service or claims["sub"] != service:
            raise IssuerMismatch(
                "the response was signed by another service",
                reason="wrong_responder",
                expected=service,
                actual=str(claims["iss"])[:64],
            )
        got = claims.get("nonce")
        if not isinstance(got, str):
            raise InvalidClaim("the response token has no nonce", expected="string", actual=type(got).__name__)
        if not secrets.compare_digest(got.encode("utf-8", "surrogatepass"), nonce.encode("utf-8", "surrogatepass")):
            raise InvalidClaim(
                "the response is bound to another request",
                reason="nonce_mismatch",
                expected="the nonce sent with this request",
                actual="another nonce",
            )
