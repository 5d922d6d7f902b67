"""FastAPI helpers: the authenticated :class:`~meshauth.Principal` as a dependency.

Authentication itself is done by :class:`meshauth.asgi.MeshAuthMiddleware`
(``app.add_middleware(MeshAuthMiddleware, verifier=...)``); these dependencies
read what it published and add per-route checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.requests import HTTPConnection
from fastapi.security import HTTPBearer, SecurityScopes

from ._middleware import PRINCIPAL_KEY, Requirement
from ._principal import Principal

__all__ = ["CurrentPrincipal", "RequirePrincipal", "bearer_scheme", "get_principal"]


class _MeshAuthBearer(HTTPBearer):
    """The ``meshauth`` bearer security scheme, declared for OpenAPI only.

    The token was already verified by the middleware; this dependency reads
    nothing, so it also works on WebSocket routes.
    """

    async def __call__(self, connection: HTTPConnection) -> None:
        return None


bearer_scheme = _MeshAuthBearer(
    bearerFormat="JWT",
    scheme_name="meshauth",
    description="A meshauth service token: `Authorization: Bearer <token>` (see meshauth.ServiceAuth).",
    auto_error=False,
)
"""The security scheme that :class:`RequirePrincipal` declares (``components.securitySchemes.meshauth``)."""


class RequirePrincipal:
    """A dependency returning the request's :class:`~meshauth.Principal`, or refusing it.

    >>> from fastapi import Depends, FastAPI
    >>> app = FastAPI()
    >>> @app.post("/charges")
    ... def charge(principal: Principal = Depends(RequirePrincipal(callers=["orders"], scopes=["charges:write"]))):
    ...     return {"caller": principal.caller}

    Raises ``HTTPException`` 401 (``WWW-Authenticate: Bearer``) when the
    middleware published no principal (it is not installed, or the path is
    excluded), 403 when the caller matches none of the ``callers`` globs, and
    403 with ``error="insufficient_scope"`` when a scope is missing. The body is
    FastAPI's ``{"detail": {"error": ..., "reason": ...}}``. ``realm`` names the
    service in ``WWW-Authenticate``.

    The dependency declares the ``meshauth`` HTTP bearer security scheme, so
    ``app.openapi()`` and Swagger UI show which routes need a token. Scopes may
    also come from FastAPI's ``Security``:
    ``Security(RequirePrincipal(), scopes=["charges:write"])`` requires them
    (added to ``scopes``) and lists them in the route's security requirement.
    """

    __slots__ = ("realm", "requirement")

    def __init__(
        self,
        callers: Iterable[str] | None = None,
        scopes: Iterable[str] | None = None,
        *,
        realm: str | None = None,
    ) -> None:
        self.requirement = Requirement.build(callers, scopes)
        self.realm = realm

    def __call__(
        self,
        connection: HTTPConnection,
        security_scopes: SecurityScopes,
        _scheme: Annotated[None, Depends(bearer_scheme)] = None,
    ) -> Principal:
        principal = connection.scope.get(PRINCIPAL_KEY)
        requirement = self.requirement
        if security_scopes.scopes:
            requirement = Requirement(requirement.callers, requirement.scopes | frozenset(security_scopes.scopes))
        refusal = requirement.refusal(principal, self.realm)
        if refusal is not None:
            headers = {"WWW-Authenticate": refusal.www_authenticate} if refusal.www_authenticate else None
            raise HTTPException(refusal.status, detail=refusal.body, headers=headers)
        assert isinstance(principal, Principal)
        return principal

    def __repr__(self) -> str:
        return f"RequirePrincipal(callers={self.requirement.callers!r}, scopes={sorted(self.requirement.scopes)!r})"


def get_principal(connection: HTTPConnection) -> Principal | None:
    """A dependency returning the principal, or None on an excluded path (never refuses)."""
    principal = connection.scope.get(PRINCIPAL_KEY)
    return principal if isinstance(principal, Principal) else None


CurrentPrincipal = Annotated[Principal, Depends(RequirePrincipal())]
"""Shorthand: ``def handler(principal: CurrentPrincipal)`` requires an authenticated caller."""
