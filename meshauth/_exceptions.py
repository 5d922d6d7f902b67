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
    │   ├── BadSignature                bad_signature
    │   ├── MissingClaim                missing_claim
    │   ├── InvalidClaim                invalid_claim
    │   ├── IssuerMismatch              issuer_mismatch
    │   ├── WrongAudience               wrong_audience
    │   ├── TokenExpired                expired
    │   ├── TokenNotYetValid            not_yet_valid
    │   ├── LifetimeTooLong             lifetime_too_long
    │   └── TokenReplayed               replayed
    ├── ResponseAuthError               missing_response, nonce_mismatch, ... (mutual auth)
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
    "ConfigurationError",
    "InvalidClaim",
    "IssuerMismatch",
    "KeysUnavailable",
    "LifetimeTooLong",
    "MalformedToken",
    "MeshAuthError",
    "MissingClaim",
    "ReplayStoreUnavailable",
    "ResponseAuthError",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenTooLarge",
    "Unavailable",
    "UnknownKey",
    "UnsupportedAlgorithm",
    "WrongAudience",
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
    """

    reason: str = "error"

    def __init__(
        self,
        detail: str,
        *,
        reason: str | None = None,
        expected: Any = None,
        actual: Any = None,
        kid: str | None = None,
    ) -> None:
        if reason is not None:
            self.reason = reason
        self.detail = detail
        self.expected = expected
        self.actual = actual
        self.kid = kid
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{self.reason}: {self.detail}"]
        if self.expected is not None or self.actual is not None:
            parts.append(f"(expected {_short(self.expected)}, found {_short(self.actual)})")
        return " ".join(parts)

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
    """The ``kid`` is not in the registry, or the key is outside its validity window."""

    reason = "unknown_kid"


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


class ResponseAuthError(MeshAuthError):
    """A response could not be proven to come from the intended service (mutual auth)."""

    reason = "invalid_response"


class AccessDenied(MeshAuthError):
    """The authenticated caller is not allowed to do this (policy decision)."""

    reason = "access_denied"


class BadPath(MeshAuthError):
    """The request path cannot be judged without guessing how the app will route it (HTTP 400).

    See :func:`meshauth.canonical_path` for the rules and the reason for each.
    """

    reason = "bad_path"


class Unavailable(MeshAuthError):
    """Something the decision depends on is down or full; the token itself was not judged.

    Never reported as a bad token: the HTTP integrations answer ``503`` with
    ``Retry-After``, and clients may retry later.
    """

    reason = "unavailable"


class KeysUnavailable(Unavailable):
    """The key registry cannot be read; the token itself was not judged."""

    reason = "keys_unavailable"


class ReplayStoreUnavailable(Unavailable):
    """The replay store is full or unreachable; the token was not judged a replay."""

    reason = "replay_store_unavailable"


class ConfigurationError(MeshAuthError, ValueError):
    """A key, registry document, policy or setting is invalid."""

    reason = "invalid_configuration"
