"""The gateway's key sources: the internal registry and each identity provider's key set.

All of them are the one JWKS client of meshauth (:class:`meshauth.JWKSEndpoint`
for a URL, :class:`meshauth.JWKSFile` for a file, OpenID Connect discovery),
with an IdP key parser for the issuers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .._discovery import DiscoveredKeys
from .._exceptions import ConfigurationError
from .._jwks_endpoint import JWKSEndpoint
from .._registry import JWKSFile, KeySource
from ._config import IssuerConfig, is_url, issuer_key_parser

__all__ = ["IDP_MAX_JWKS_BYTES", "open_issuer_keys", "open_registry", "source_ready"]


def open_registry(location: str, *, source: str = "<config>") -> KeySource:
    """The internal key registry: a :class:`meshauth.JWKSFile`, or a JWKS endpoint for a URL."""
    if not is_url(location):
        try:
            return JWKSFile(location)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: registry: {exc.detail}", reason="invalid_config") from None
    try:
        return JWKSEndpoint(location)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{source}: registry: {exc.detail}", reason="invalid_config") from None


# An IdP publishes a handful of keys: 1 MiB is plenty, and bounds what a bad answer costs.
IDP_MAX_JWKS_BYTES: Final = 1 << 20


def open_issuer_keys(issuer: IssuerConfig, *, source: str = "<config>", where: str = "jwks") -> KeySource:
    """An issuer's key set: by OpenID Connect discovery, a :class:`meshauth.JWKSEndpoint` for a URL, or a file."""
    try:
        if issuer.discovery:
            limit = {"max_bytes": IDP_MAX_JWKS_BYTES}
            return DiscoveredKeys(issuer.issuer, algorithms=issuer.algorithms, endpoint_options=limit)
        parser = issuer_key_parser(issuer)
        if is_url(issuer.jwks):
            return JWKSEndpoint(issuer.jwks, parser=parser, max_bytes=IDP_MAX_JWKS_BYTES)
        return JWKSFile(issuer.jwks, parser=parser)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{source}: {where}: {exc.detail}", reason="invalid_config") from None


def source_ready(source: object) -> bool:
    status = getattr(source, "status", None)
    if status is None:
        return True
    try:
        document = status()
    except Exception:
        return False
    return bool(document.get("ready", True)) if isinstance(document, Mapping) else True
