"""What a callee's ``401`` says, for the outbound clients (httpx, requests, gRPC).

A callee that refuses a token answers ``WWW-Authenticate: Bearer realm="<its
name>", error="invalid_token", error_description="<reason>"`` (RFC 6750). A
new token cures some reasons (the callee rotated keys, or saw the token
before); for the others a retry fails the same way, so the caller does not
retry and logs what to fix instead.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable
from typing import Final

__all__ = ["CURABLE_REASONS", "Challenge", "read_challenge", "refusal_message", "warn_refused"]

CURABLE_REASONS: Final = frozenset({"expired", "unknown_kid", "key_expired", "replayed", "bad_signature"})
"""Rejection reasons a freshly minted token can cure: retried once."""

# RFC 7235 auth-params: name=token or name="quoted string".
_PARAM: Final = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,;"]+))')

_FIXES: Final = {
    "wrong_audience": (
        "the token was minted for audience {audience!r} but the service that answered is {realm!r}: "
        "use the callee's service name as the audience (ServiceAuth's audience= or host mapping, "
        "or the gRPC client interceptor's audience=)"
    ),
    "not_yet_valid": "the callee {realm!r} finds the token issued in the future: check this host's clock (NTP)",
    "lifetime_too_long": (
        "the callee {realm!r} accepts shorter token lifetimes than this identity's ttl: lower ServiceIdentity(ttl=)"
    ),
    "issuer_mismatch": "the callee {realm!r} finds this service's key registered to another service",
}

logger = logging.getLogger("meshauth")


@dataclasses.dataclass(frozen=True, slots=True)
class Challenge:
    """The Bearer challenge of a ``401``: who answered, and why it refused."""

    realm: str | None
    error: str | None
    reason: str | None

    @property
    def invalid_token(self) -> bool:
        """The callee rejected the token itself (``error="invalid_token"``)."""
        return self.error is not None and self.error.lower() == "invalid_token"

    @property
    def curable(self) -> bool:
        """A new token may succeed: the token was rejected for a reason a re-mint cures.

        A challenge without ``error_description`` is treated as curable, so
        callees that do not name the reason still get one retry.
        """
        return self.invalid_token and (self.reason is None or self.reason in CURABLE_REASONS)


def read_challenge(values: Iterable[str]) -> Challenge:
    """The first Bearer challenge's ``realm``, ``error`` and ``error_description``."""
    params: dict[str, str] = {}
    for value in values:
        for match in _PARAM.finditer(value):
            name = match.group(1).lower()
            text = match.group(2) if match.group(2) is not None else match.group(3)
            params.setdefault(name, re.sub(r"\\(.)", r"\1", text))
    return Challenge(params.get("realm"), params.get("error"), params.get("error_description"))


def refusal_message(challenge: Challenge, *, caller: str, audience: str, target: str) -> str:
    """One sentence for a person: who refused ``caller``'s token, why, and what to change."""
    realm = challenge.realm or "?"
    reason = challenge.reason or "invalid_token"
    message = f"{target} (realm {realm!r}) refused the token {caller!r} minted for audience {audience!r}: {reason}"
    fix = _FIXES.get(reason)
    if fix is not None:
        message += "; " + fix.format(audience=audience, realm=realm)
    return message


def warn_refused(challenge: Challenge, *, caller: str, audience: str, target: str) -> None:
    """Log, once per refusal, why a token was refused without a retry."""
    logger.warning("meshauth: %s", refusal_message(challenge, caller=caller, audience=audience, target=target))
