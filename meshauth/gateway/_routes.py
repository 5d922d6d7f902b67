"""Routes compiled for matching, authorizing and forwarding (the ``[[routes]]`` of the configuration).

Who may use a route is decided by :class:`meshauth.Policy`, the same engine
the middlewares use: each route compiles into one policy for end users
(``issuers``, ``subjects``, ``groups``, ``scopes``) and, on a route with
``accept_service_tokens``, one for services (``callers``, ``subjects``,
``scopes``). The method is the route's own property (``405`` with ``Allow``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import httpx

from .._policy import Policy
from ._config import RouteConfig, Timeout

__all__ = ["Route", "compile_route", "forward_path", "route_policies"]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """A route compiled for matching and forwarding."""

    config: RouteConfig
    prefix: str
    base: httpx.URL
    base_path: bytes
    origin: tuple[str, str, int]
    """Scheme, host and port of the upstream (the connection pool's key)."""
    authority: bytes
    """The ``Host`` header sent upstream."""
    methods: frozenset[str] | None
    allow: bytes
    users: Policy
    """Who may use the route with an identity provider's token."""
    services: Policy | None
    """Which services may use it with a service token (``accept_service_tokens``), else None."""
    timeout: dict[str, float]


def route_policies(route: RouteConfig) -> tuple[Policy, Policy | None]:
    """The route's rules as policies: one for end users, one for services when the route takes them."""
    shared: dict[str, Any] = {"name": route.prefix}
    if route.subjects is not None:
        shared["subjects"] = list(route.subjects)
    if route.scopes:
        shared["scopes"] = list(route.scopes)
    users = dict(shared)
    if route.issuers is not None:
        users["issuers"] = list(route.issuers)
    if route.groups is not None:
        users["groups"] = list(route.groups)
    where = f"route {route.prefix}"
    user_policy = Policy.from_dict({"rules": [users]}, source=where)
    if not route.accept_service_tokens:
        return user_policy, None
    services = dict(shared)
    if route.callers is not None:
        services["callers"] = list(route.callers)
    # Delegated service tokens are judged by the gateway (its own name never in the chain).
    return user_policy, Policy.from_dict({"delegators": ["*"], "rules": [services]}, source=where)


def _httpx_timeout(timeout: Timeout) -> dict[str, float]:
    # The form httpx transports read from ``request.extensions["timeout"]``.
    return {"connect": timeout.connect, "read": timeout.read, "write": timeout.read, "pool": timeout.connect}


def compile_route(route: RouteConfig, default_timeout: Timeout) -> Route:
    base = httpx.URL(route.upstream)
    methods = frozenset(route.methods) if route.methods is not None else None
    users, services = route_policies(route)
    return Route(
        config=route,
        prefix=route.prefix,
        base=base,
        base_path=base.raw_path.split(b"?", 1)[0].rstrip(b"/"),
        origin=(base.scheme, base.host, base.port or (443 if base.scheme == "https" else 80)),
        authority=base.netloc,
        methods=methods,
        allow=", ".join(sorted(methods or ())).encode("ascii"),
        users=users,
        services=services,
        timeout=_httpx_timeout(route.timeout or default_timeout),
    )


def forward_path(canonical: str, route: Route) -> bytes:
    """The path sent upstream: byte for byte the canonical path the policy judged.

    With ``strip_prefix`` the route's prefix is removed first (the upstream's
    base path is added by the caller).
    """
    if route.config.strip_prefix and route.prefix != "/":
        rest = canonical[len(route.prefix) :]
        canonical = rest if rest.startswith("/") else "/" + rest
    return canonical.encode("ascii")
