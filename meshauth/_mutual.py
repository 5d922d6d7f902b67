"""Mutual authentication: proving which service answered a request.

The caller sends a fresh random ``Meshauth-Nonce`` with each request; the
callee answers with a ``Meshauth-Response`` token (``typ``
``meshauth-response+jwt``) signed with its own key, addressed to the caller
and bound to that nonce. :class:`ResponseVerifier` checks it.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

from opentelemetry import metrics, trace

from ._engine import Profile
from ._exceptions import (
    InvalidClaim,
    MeshAuthError,
    MissingResponse,
    NonceMismatch,
    ResponseAuthError,
    StatusMismatch,
    WrongAudience,
    WrongResponder,
)
from ._keys import KeyRecord
from ._principal import Principal
from ._proof import NO_CALLER, RESPONSE_HEADER
from ._registry import KeySource
from ._replay import MemoryReplayCache
from ._verify import RESPONSE_TOKEN_TYPE, Verifier, service_claims, service_profile

__all__ = ["NONCE_HEADER", "RESPONSE_HEADER", "ResponseVerifier", "new_nonce", "response_profile"]

NONCE_HEADER: Final = "Meshauth-Nonce"
MAX_RESPONSE_LIFETIME: Final = 60
_DIGEST_LENGTH: Final = 43  # unpadded base64url of 32 bytes
_DIGEST: Final = re.compile(r"[A-Za-z0-9_-]{43}")
_NOT_A_RESPONSE_TOKEN: Final = {"meshauth+jwt": " (a service token is never accepted as a response token)"}


def _present(token: str | None, service: str) -> str:
    """The response token, or ``missing_response`` when the response carried none."""
    if not token:
        raise MissingResponse(
            f"no {RESPONSE_HEADER} header in the response from {service!r}: "
            "did the callee's middleware get identity=? (it signs responses only with one)",
            expected=service,
            actual="nothing",
        )
    return token


def _as_response_error(exc: MeshAuthError) -> ResponseAuthError:
    """A refused response token as a :class:`ResponseAuthError`, keeping the token check's reason."""
    if isinstance(exc, ResponseAuthError):
        return exc
    return ResponseAuthError(
        f"response could not be authenticated: {exc.detail}",
        reason=exc.reason,
        expected=exc.expected,
        actual=exc.actual,
        kid=exc.kid,
        caller=exc.caller,
    )


def response_claims(caller: str) -> Callable[[dict[str, Any], KeyRecord, Any], Principal]:
    """The response-token claim rule: the service-token rule, then responder, nonce, status and digest.

    ``expect`` is the per-call ``(service, nonce, status)`` of
    :meth:`ResponseVerifier.verify_response` (``status`` None: not checked).
    """
    base = service_claims(caller)

    def check(claims: dict[str, Any], record: KeyRecord, expect: Any) -> Principal:
        if expect is None:
            raise InvalidClaim("response tokens are checked with verify_response()")
        service, nonce, status = expect
        if claims["iss"] != service or claims["sub"] != service:
            raise WrongResponder(
                f"the response was signed by {str(claims['iss'])[:64]!r}, not by {service!r} that was called",
                expected=service,
                actual=str(claims["iss"])[:64],
            )
        principal = base(claims, record, expect)
        got = claims["nonce"]
        if not isinstance(got, str):
            raise InvalidClaim(
                "the response token's nonce is not a string", expected="string", actual=type(got).__name__
            )
        if not secrets.compare_digest(got.encode("utf-8", "surrogatepass"), nonce.encode("utf-8", "surrogatepass")):
            raise NonceMismatch(
                "the response is bound to another request (its nonce is not the one sent)",
                expected="the nonce sent with this request",
                actual="another nonce",
            )
        _check_status_and_digest(claims, status)
        return principal

    return check


def _check_status_and_digest(claims: dict[str, Any], status: int | None) -> None:
    signed = claims["status"]
    if type(signed) is not int:
        raise InvalidClaim(
            "the response token's 'status' is not an integer", expected="int", actual=type(signed).__name__
        )
    if status is not None and signed != status:
        raise StatusMismatch(
            f"the response token was signed for status {signed}, but the response has status {status}",
            expected=signed,
            actual=status,
        )
    if claims["aud"] == NO_CALLER and signed != 401:
        # "-" says the request named no caller that could be read: only a 401 may say that.
        raise WrongAudience(
            f"the response is addressed to no caller ('-') with status {signed}; only a 401 may be",
            expected="this service",
            actual=NO_CALLER,
        )
    digest = claims.get("body_sha256")
    if digest is not None and (type(digest) is not str or _DIGEST.fullmatch(digest) is None):
        raise InvalidClaim(
            "the response token's 'body_sha256' is not a base64url SHA-256 digest",
            expected=f"{_DIGEST_LENGTH} characters",
            actual=type(digest).__name__,
        )


def response_profile(caller: str, *, leeway: float = 30) -> Profile[Principal]:
    """The profile of response tokens addressed to ``caller`` (mutual authentication)."""
    service = service_profile(caller, leeway=leeway, max_lifetime=MAX_RESPONSE_LIFETIME)
    return dataclasses.replace(
        service,
        name="response",
        types=frozenset({RESPONSE_TOKEN_TYPE}),
        claims=response_claims(caller),
        required_claims=(*service.required_claims, "nonce", "status"),
        audiences=frozenset({caller, NO_CALLER}),
        typ_refused_hint=_NOT_A_RESPONSE_TOKEN,
    )


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
        # cannot be shown an old answer twice. Responses answer this client's own requests,
        # so one responder may use the whole capacity (no per-issuer share).
        super().__init__(
            caller,
            keys,
            leeway=leeway,
            max_lifetime=MAX_RESPONSE_LIFETIME,
            clock=clock,
            cache_size=0,
            replay_cache=MemoryReplayCache(max_entries=200_000, max_per_issuer=200_000, grace=leeway, clock=clock),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )

    def _profile(self, audience: str, leeway: float, max_lifetime: int, max_token_bytes: int) -> Profile[Principal]:
        return response_profile(audience, leeway=leeway)

    def verify_response(self, token: str | None, *, service: str, nonce: str, status: int | None = None) -> Principal:
        """Check that ``token`` proves ``service`` answered the request carrying ``nonce`` with ``status``.

        The token's ``body_sha256`` (``principal.claims``), when present, is
        the digest the received body must have: :class:`~meshauth.ServiceAuth`
        checks it on the bytes as they arrive.

        Raises:
            ResponseAuthError: a :class:`~meshauth.MissingResponse`,
                :class:`~meshauth.WrongResponder` or
                :class:`~meshauth.NonceMismatch`, or the token's own rejection
                reason (``bad_signature``, ``expired``, ...).
        """
        token = _present(token, service)
        try:
            return self._verify(token, (service, nonce, status), True)
        except MeshAuthError as exc:
            raise _as_response_error(exc) from exc

    async def averify_response(
        self, token: str | None, *, service: str, nonce: str, status: int | None = None
    ) -> Principal:
        """Async form of :meth:`verify_response` (for async key sources)."""
        token = _present(token, service)
        try:
            return await self._averify(token, (service, nonce, status), True)
        except MeshAuthError as exc:
            raise _as_response_error(exc) from exc
