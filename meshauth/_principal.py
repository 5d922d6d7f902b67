"""The verified identity behind a request."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

__all__ = ["Principal"]

_NO_CONTEXT: Final[Mapping[str, Any]] = MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling, as proven by a verified service token (and Txn-Token).

    ``caller`` is the service that signed the service token (``iss``). Inside a
    transaction (the request carried a Txn-Token bound to the service token),
    ``subject`` is the Txn-Token's ``sub`` (the end user), ``transaction`` its
    ``txn`` id, ``txn_issuer`` the service that issued it and ``context`` its
    ``tctx``; ``scopes`` are then the Txn-Token's scopes. Outside one,
    ``subject`` is the caller itself and ``transaction`` is ``None``.

    >>> p = Principal(caller="orders", subject="orders", audience="payments", scopes=frozenset(),
    ...               token_id="j1", issued_at=0, expires_at=300, kid="k", alg="ES256", claims={})
    >>> p.delegated, p.transaction
    (False, None)
    """

    caller: str
    subject: str
    audience: str
    scopes: frozenset[str]
    token_id: str
    issued_at: int
    expires_at: int
    kid: str
    alg: str
    claims: Mapping[str, Any] = dataclasses.field(hash=False, compare=False, repr=False)
    transaction: str | None = None
    txn_issuer: str | None = None
    context: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: _NO_CONTEXT, hash=False, compare=False, repr=False
    )
    txn_token: str | None = dataclasses.field(default=None, hash=False, compare=False, repr=False)
    """The Txn-Token as received, for forwarding; never in a repr, log or span."""

    @property
    def delegated(self) -> bool:
        """True when the call is made inside a user's transaction."""
        return self.transaction is not None

    @property
    def scope(self) -> str:
        """The scopes as a space-separated string (empty when there are none)."""
        return " ".join(sorted(self.scopes))


_new = object.__new__
# The hot-path constructors below hand a new instance its whole attribute dict in one
# step, instead of the frozen dataclass's __init__ (one object.__setattr__ per field):
# about a microsecond less per verification. Same fields, same values, same class.
_set_fields = object.__setattr__


def make_principal(  # noqa: PLR0917 - positional on purpose: keywords cost on the hot path
    caller: str,
    audience: str,
    scopes: frozenset[str],
    token_id: str,
    issued_at: int,
    expires_at: int,
    kid: str,
    alg: str,
    claims: Mapping[str, Any],
) -> Principal:
    """Build a service-only :class:`Principal` (``subject`` = ``caller``) on the verifier's hot path.

    Equivalent to ``Principal(...)`` with ``subject=caller`` and no transaction.
    """
    principal: Principal = _new(Principal)
    _set_fields(
        principal,
        "__dict__",
        {
            "caller": caller,
            "subject": caller,
            "audience": audience,
            "scopes": scopes,
            "token_id": token_id,
            "issued_at": issued_at,
            "expires_at": expires_at,
            "kid": kid,
            "alg": alg,
            "claims": claims,
            "transaction": None,
            "txn_issuer": None,
            "context": _NO_CONTEXT,
            "txn_token": None,
        },
    )
    return principal


def in_transaction(  # noqa: PLR0917 - positional on purpose: runs on every request inside a transaction
    service: Principal,
    subject: str,
    scopes: frozenset[str],
    transaction: str,
    txn_issuer: str,
    context: Mapping[str, Any],
    txn_token: str,
) -> Principal:
    """``service`` (a verified service principal) inside the verified transaction described by the rest."""
    principal: Principal = _new(Principal)
    _set_fields(
        principal,
        "__dict__",
        {
            **service.__dict__,
            "subject": subject,
            "scopes": scopes,
            "transaction": transaction,
            "txn_issuer": txn_issuer,
            "context": context,
            "txn_token": txn_token,
        },
    )
    return principal
