"""The meshauth exception tree.

Every failure meshauth reports is a :class:`MeshAuthError` with a stable,
machine-readable ``reason`` code. Callers branch on the class or on
``reason``; the message is for humans and states what was expected and what
was found. No message, field or ``repr`` ever contains a token, a signature or
key material.

::

    MeshAuthError                       reason
    ├── TokenError                      (one subclass per reason below)
    │   ├── TokenTooLarge               too_large
    │   ├── MalformedToken              malformed
    │   ├── WrongTokenType              wrong_type
    │   ├── UnsupportedAlgorithm        unsupported_alg
    │   ├── UnknownKey                  unknown_kid
    │   ├── KeyExpired                  key_expired
    │   ├── BadSignature                bad_signature
    │   ├── MissingClaim                missing_claim
    │   ├── InvalidClaim                invalid_claim
    │   ├── IssuerMismatch              issuer_mismatch
    │   ├── WrongAudience               wrong_audience
    │   ├── TokenExpired                expired
    │   ├── TokenNotYetValid            not_yet_valid
    │   ├── LifetimeTooLong             lifetime_too_long
    │   ├── TokenReplayed               replayed
    │   ├── MissingCredentials          missing_credentials (no Bearer token in the request)
    │   ├── WrongScheme                 wrong_scheme (Authorization is not Bearer)
    │   └── DuplicateAuthorization      duplicate_authorization (Authorization sent twice)
    ├── ResponseAuthError               the response token's own reason (bad_signature, ...), or:
    │   ├── MissingResponse             missing_response
    │   ├── WrongResponder              wrong_responder
    │   ├── NonceMismatch               nonce_mismatch
    │   ├── StatusMismatch              status_mismatch
    │   ├── BodyMismatch                body_mismatch
    │   └── UnboundBody                 unbound_body
    ├── InvalidNonce                    invalid_nonce (a bad Meshauth-Nonce request header: HTTP 400)
    ├── AccessDenied                    access_denied (policy)
    ├── BadPath                         bad_path (a request path that cannot be judged: HTTP 400)
    ├── Unavailable                     (a dependency is down or full: HTTP 503, never a bad token)
    │   ├── KeysUnavailable             keys_unavailable (registry unreadable, or an unknown kid
    │   │                               could not be looked up because the registry is failing)
    │   └── ReplayStoreUnavailable      replay_store_unavailable (replay store full or unreachable)
    └── ConfigurationError              invalid_key, invalid_registry, invalid_policy, ...
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AccessDenied",
    "BadPath",
    "BadSignature",
    "BodyMismatch",
    "ConfigurationError",
    "DuplicateAuthorization",
    "InvalidClaim",
    "InvalidNonce",
    "IssuerMismatch",
    "KeyExpired",
    "KeysUnavailable",
    "LifetimeTooLong",
    "MalformedToken",
    "MeshAuthError",
    "MissingClaim",
    "MissingCredentials",
    "MissingResponse",
    "MissingTxnToken",
    "NonceMismatch",
    "ReplayStoreUnavailable",
    "ResponseAuthError",
    "StatusMismatch",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenTooLarge",
    "TxnMismatch",
    "Unavailable",
    "UnboundBody",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "UntrustedTxnIssuer",
    "WrongAudience",
    "WrongResponder",
    "WrongScheme",
    "WrongTokenType",
]


class MeshAuthError(Exception):
    """Base class of every error meshauth raises on purpose.

    Attributes:
        reason: a stable short code (``"expired"``, ``"unknown_kid"``, ...).
        detail: a human explanation, without secrets.
        expected: what the check wanted, when that is meaningful.
        actual: what the check found, when that is meaningful and not secret.
        kid: the key id involved, if any (key ids are public).
        caller: the service proven to have signed the token (set only once the
            signature verified and ``iss`` owns the key), else ``None``.
        issuer: the configured identity provider a user token was judged
            against (gateway), else ``None``.
    """

    reason: str = "error"
    status: ClassVar[int] = 500
    """The HTTP status an inbound request refused with this error gets (one table: the classes)."""
    error: ClassVar[str] = "server_error"
    """The ``error`` member of that response's JSON body (RFC 6750 codes where one fits)."""
    detail: str
    expected: Any
    actual: Any
    kid: str | None
    caller: str | None
    issuer: str | None

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        expected: Any = None,
        actual: Any = None,
        kid: str | None = None,
        caller: str | None = None,
        issuer: str | None = None,
    ) -> None:
        if reason is not None:
            self.reason = reason
        self.detail = detail
        self.expected = expected
        self.actual = actual
        self.kid = kid
        self.caller = caller
        self.issuer = issuer
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{self.reason}: {self.detail}"]
        # Only what is known is shown: never "expected None".
        if self.expected is not None and self.actual is not None:
            parts.append(f"(expected {_short(self.expected)}, found {_short(self.actual)})")
        elif self.expected is not None:
            parts.append(f"(expected {_short(self.expected)})")
        elif self.actual is not None:
            parts.append(f"(found {_short(self.actual)})")
        return " ".join(parts)

    def __str__(self) -> str:
        # Rendered again: the fields (kid, caller) may be completed after construction
        # by the engine that raised the error, before it leaves meshauth.
        return self._render()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, detail={self.detail!r})"


def _short(value: Any, limit: int = 80) -> str:
    """Render a value for a message, bounded so hostile input cannot bloat logs."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


class TokenError(MeshAuthError):
    """A token was rejected. ``reason`` says why; subclasses exist per reason."""

    reason = "invalid_token"
    status = 401
    error = "invalid_token"
    by_reason: ClassVar[dict[str, type[TokenError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        TokenError.by_reason[cls.reason] = cls


class TokenTooLarge(TokenError):
    """The token is longer than the configured size limit."""

    reason = "too_large"


class MalformedToken(TokenError):
    """The token is not a strictly well-formed compact JWS of the meshauth profile."""

    reason = "malformed"


class WrongTokenType(TokenError):
    """The ``typ`` header is missing or names another kind of token."""

    reason = "wrong_type"


class UnsupportedAlgorithm(TokenError):
    """The ``alg`` header is not allowed, or not the algorithm bound to the key."""

    reason = "unsupported_alg"


class UnknownKey(TokenError):
    """The ``kid`` is not in a key set that was read successfully."""

    reason = "unknown_kid"


class KeyExpired(TokenError):
    """The key is known but outside its ``nbf``/``exp`` window (plus leeway)."""

    reason = "key_expired"


class BadSignature(TokenError):
    """The signature does not verify with the registered key."""

    reason = "bad_signature"


class MissingClaim(TokenError):
    """A required claim is absent."""

    reason = "missing_claim"


class InvalidClaim(TokenError):
    """A claim has the wrong type or shape."""

    reason = "invalid_claim"


class IssuerMismatch(TokenError):
    """``iss`` is not the owner of the signing key, or not the outermost actor."""

    reason = "issuer_mismatch"


class WrongAudience(TokenError):
    """The token is meant for another service."""

    reason = "wrong_audience"


class TokenExpired(TokenError):
    """``exp`` has passed, beyond the leeway."""

    reason = "expired"


class TokenNotYetValid(TokenError):
    """``nbf`` or ``iat`` lies in the future, beyond the leeway."""

    reason = "not_yet_valid"


class LifetimeTooLong(TokenError):
    """``exp - iat`` exceeds the verifier's ``max_lifetime``."""

    reason = "lifetime_too_long"


class TokenReplayed(TokenError):
    """The token's ``jti`` was already accepted once (replay cache on)."""

    reason = "replayed"


class MissingTxnToken(TokenError):
    """The service token is bound to a Txn-Token (``tth``) but the request carries none."""

    reason = "missing_txn_token"


class TxnMismatch(TokenError):
    """``tth`` does not match the Txn-Token sent, or a Txn-Token came without ``tth``."""

    reason = "txn_mismatch"


class UntrustedTxnIssuer(TokenError):
    """The Txn-Token was signed by a service not in the verifier's ``txn_issuers``."""

    reason = "untrusted_txn_issuer"


class MissingCredentials(TokenError):
    """The request carries no ``Authorization: Bearer`` token."""

    reason = "missing_credentials"
    status = 401
    error = "unauthorized"


class WrongScheme(TokenError):
    """The ``Authorization`` scheme is not ``Bearer``."""

    reason = "wrong_scheme"


class DuplicateAuthorization(TokenError):
    """The request carries more than one ``Authorization`` header."""

    reason = "duplicate_authorization"


class ResponseAuthError(MeshAuthError):
    """A response could not be proven to come from the intended service (mutual auth).

    A response token refused by the token checks keeps that check's reason
    (``bad_signature``, ``expired``, ...) with the :class:`TokenError` as
    ``__cause__``; the mutual-auth checks have one subclass each.
    """

    reason = "invalid_response"


class MissingResponse(ResponseAuthError):
    """The response carried no ``Meshauth-Response`` token."""

    reason = "missing_response"


class WrongResponder(ResponseAuthError):
    """The response token was signed by another service than the one called."""

    reason = "wrong_responder"


class NonceMismatch(ResponseAuthError):
    """The response token is bound to another request's nonce."""

    reason = "nonce_mismatch"


class StatusMismatch(ResponseAuthError):
    """The response token is bound to another HTTP status than the one received."""

    reason = "status_mismatch"


class BodyMismatch(ResponseAuthError):
    """The response token is bound to other body bytes than the ones received."""

    reason = "body_mismatch"


class UnboundBody(ResponseAuthError):
    """The response token does not bind the body, and the client did not allow that."""

    reason = "unbound_body"


class InvalidNonce(MeshAuthError):
    """The request's ``Meshauth-Nonce`` header is repeated or not a valid nonce (HTTP 400)."""

    reason = "invalid_nonce"
    status = 400
    error = "invalid_request"


class AccessDenied(MeshAuthError):
    """The authenticated caller is not allowed to do this (policy decision)."""

    reason = "access_denied"
    status = 403
    error = "forbidden"


class BadPath(MeshAuthError):
    """The request path cannot be judged without guessing how the app will route it (HTTP 400).

    See :func:`meshauth.canonical_path` for the rules and the reason for each.
    """

    reason = "bad_path"
    status = 400
    error = "bad_request"


class Unavailable(MeshAuthError):
    """Something the decision depends on is down or full; the token itself was not judged.

    Never reported as a bad token: the HTTP integrations answer ``503`` with
    ``Retry-After``, and clients may retry later.
    """

    reason = "unavailable"
    status = 503
    error = "temporarily_unavailable"


class KeysUnavailable(Unavailable):
    """The key registry cannot be read; the token itself was not judged."""

    reason = "keys_unavailable"


class ReplayStoreUnavailable(Unavailable):
    """The replay store is full or unreachable; the token was not judged a replay."""

    reason = "replay_store_unavailable"


class ConfigurationError(MeshAuthError, ValueError):
    """A key, registry document, policy or setting is invalid."""

    reason = "invalid_configuration"
