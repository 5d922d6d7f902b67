"""Routes compiled for matching and forwarding (the ``[[routes]]`` of the configuration)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable

import httpx

from ._config import RouteConfig, Timeout

__all__ = ["Route", "compile_route", "forward_path"]


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """A route compiled for matching and forwarding."""

    config: RouteConfig
    prefix: str
    base: httpx.URL
    base_path: bytes
    methods: frozenset[str] | None
    allow: bytes
    issuers: frozenset[str] | None
    subjects: Callable[[str], bool] | None
    callers: Callable[[str], bool] | None
    groups: frozenset[str] | None
    scopes: frozenset[str]
    timeout: dict[str, float]


def _glob_matcher(patterns: tuple[str, ...] | None) -> Callable[[str], bool] | None:
    if patterns is None:
        return None
    if "*" in patterns:
        return lambda _value: True
    regex = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
    return lambda value: regex.match(value) is not None


def _httpx_timeout(timeout: Timeout) -> dict[str, float]:
    # The form httpx transports read from ``request.extensions["timeout"]``.
    return {"connect": timeout.connect, "read": timeout.read, "write": timeout.read, "pool": timeout.connect}


def compile_route(route: RouteConfig, default_timeout: Timeout) -> Route:
    base = httpx.URL(route.upstream)
    methods = frozenset(route.methods) if route.methods is not None else None
    return Route(
        config=route,
        prefix=route.prefix,
        base=base,
        base_path=base.raw_path.split(b"?", 1)[0].rstrip(b"/"),
        methods=methods,
        allow=", ".join(sorted(methods or ())).encode("ascii"),
        issuers=frozenset(route.issuers) if route.issuers is not None else None,
        subjects=_glob_matcher(route.subjects),
        callers=_glob_matcher(route.callers),
        groups=frozenset(route.groups) if route.groups is not None else None,
        scopes=frozenset(route.scopes or ()),
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
