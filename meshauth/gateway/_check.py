"""``meshauth gateway --check``: is this configuration ready to serve? One line per check.

Checks, in order: the file parses and validates (keys, names, routes); the
signing key loads; the registry can be read (fetched, for a URL); each
issuer's key set can be read (fetched, for a URL, through discovery when it is
configured). Nothing is served and no port is bound.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import ConfigurationError
from ._config import load_config
from ._proxy import Gateway, create_app

__all__ = ["check"]

Print = Callable[[str], None]


def check(config_path: str | os.PathLike[str], *, out: Print = print) -> int:
    """Run every check, print ``ok``/``FAIL`` lines through ``out``; ``0`` when all pass, else ``1``."""
    try:
        config = load_config(config_path)
    except ConfigurationError as exc:
        out(f"FAIL config: {exc.detail}")
        return 1
    out(f"ok   config: {config.source} ({len(config.routes)} routes, {len(config.issuers)} issuers)")
    try:
        gateway = create_app(config, configure_audit=False)
    except ConfigurationError as exc:
        out(f"FAIL keys: {exc.detail}")
        return 1
    out(f"ok   signing key: {config.service} (kid {gateway.identity.key.kid})")
    return 0 if asyncio.run(_reach_key_sets(gateway, out)) else 1


async def _reach_key_sets(gateway: Gateway, out: Print) -> bool:
    async with gateway:  # start-up fetches every URL key set once
        results = [_line("registry", gateway.registry, out)]
        results += [_line(f"issuer {name}", source, out) for name, source in gateway.issuer_keys.items()]
    return all(results)


def _line(what: str, source: object, out: Print) -> bool:
    status: Any = getattr(source, "status", None)
    document: Mapping[str, Any] = status() if status is not None else {"ready": True}
    where = str(document.get("source") or type(source).__name__)
    if document.get("jwks_uri"):  # found by OpenID Connect discovery
        where += f" -> {document['jwks_uri']}"
    keys = document.get("keys")
    if document.get("ready", True):
        out(f"ok   {what}: {where}" + (f" ({keys} keys)" if keys is not None else ""))
        return True
    problem = document.get("discovery_error") or document.get("last_error") or "no usable key set"
    out(f"FAIL {what}: {where}: {str(problem)[:200]}")
    return False
