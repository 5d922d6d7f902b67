"""The verified identity behind a request."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Principal"]


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by a verified service token.

    ``caller`` is the service that signed the token (``iss``). ``subject`` is
    the principal the call is made for: the caller itself for a plain service
    call, or an end user (``"alice"``) when delegated. ``actors`` is the whole
    delegation chain, newest first, starting with ``caller``; it is empty for a
    plain service call.

    >>> p = Principal(caller="orders", subject="alice", actors=("orders", "gateway"),
    ...               audience="payments", scopes=frozenset(), token_id="j1",
    ...               issued_at=0, expires_at=300, kid="k", alg="ES256", claims={})
    >>> p.delegated
    True
    """

    caller: str
    subject: str
    actors: tuple[str, ...]
    audience: str
    scopes: frozenset[str]
    token_id: str
    issued_at: int
    expires_at: int
    kid: str
    alg: str
    claims: Mapping[str, Any] = dataclasses.field(hash=False, compare=False, repr=False)

    @property
    def delegated(self) -> bool:
        """True when the call is made on behalf of someone other than the caller."""
        return self.subject != self.caller

    @property
    def scope(self) -> str:
        """The ``scope`` claim as a space-separated string (empty when absent)."""
        return " ".join(sorted(self.scopes))
