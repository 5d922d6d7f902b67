"""``meshauth gateway --check``: is this configuration ready to serve? One line per check.

Checks, in order: the file parses and validates (keys, names, routes, limits);
the signing key loads; the registry can be read (fetched, for a URL); each
issuer's key set can be read (fetched, for a URL, through OpenID Connect
discovery when it is configured). Nothing is served and no port is bound.
The report has the layout of ``meshauth doctor``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

from .._doctor import FAIL, OK, Check, report_lines
from .._exceptions import ConfigurationError, Unavailable
from .._telemetry import escape_line_breaks
from ._config import load_config
from ._proxy import Gateway, create_app

__all__ = ["check", "gateway_checks"]

_UNREACHABLE_FIX = "check the URL, and that this host can reach it (proxy, firewall, DNS)"


def check(config_path: str | os.PathLike[str], *, out: Callable[[str], None] = print) -> int:
    """Run :func:`gateway_checks` and print the report through ``out``; ``0`` when all pass, else ``1``."""
    checks = gateway_checks(config_path)
    for line in report_lines(checks, lambda text: escape_line_breaks(str(text))):
        out(line)
    return 1 if any(item.status == FAIL for item in checks) else 0


def gateway_checks(config_path: str | os.PathLike[str]) -> list[Check]:
    """Every check, in order; a failed configuration or key stops the list there."""
    try:
        config = load_config(config_path)
    except ConfigurationError as exc:
        return [Check("config", FAIL, exc.detail, "see the configuration reference in docs/gateway.md")]
    checks = [Check("config", OK, f"{config.source}: {len(config.routes)} routes, {len(config.issuers)} issuers")]
    try:
        gateway = create_app(config, configure_audit=False)  # with a Redis registry: publishes a key, once
    except (ConfigurationError, Unavailable) as exc:
        return [*checks, Check("signing key", FAIL, exc.detail)]
    published = f", published in {config.registry_namespace!r}" if config.key_file is None else ""
    checks.append(Check("signing key", OK, f"{config.service}: kid {gateway.identity.key.kid}{published}"))
    return checks + asyncio.run(_reach_key_sets(gateway))


async def _reach_key_sets(gateway: Gateway) -> list[Check]:
    async with gateway:  # start-up fetches every URL key set once
        checks = [_key_set("registry", gateway.registry)]
        checks += [_key_set(f"issuer {name}", source) for name, source in gateway.issuer_keys.items()]
    return checks


def _key_set(name: str, source: object) -> Check:
    status: Any = getattr(source, "status", None)
    document: Mapping[str, Any] = status() if status is not None else {"ready": True}
    where = str(document.get("source") or type(source).__name__)
    if document.get("jwks_uri"):  # found by OpenID Connect discovery
        where += f" -> {document['jwks_uri']}"
    if document.get("ready", True):
        keys = document.get("keys")
        return Check(name, OK, where + (f": {keys} keys" if keys is not None else ""))
    problem = document.get("discovery_error") or document.get("last_error") or "no usable key set"
    return Check(name, FAIL, f"{where}: {str(problem)[:200]}", _UNREACHABLE_FIX)
