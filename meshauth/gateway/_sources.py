"""The gateway's key sources: the internal registry and each identity provider's key set.

All of them are the one JWKS client of meshauth (:class:`meshauth.JWKSEndpoint`
for a URL, :class:`meshauth.JWKSFile` for a file, OpenID Connect discovery),
with an IdP key parser for the issuers.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any, Final

from .._discovery import DiscoveredKeys
from .._exceptions import ConfigurationError
from .._identity import ServiceIdentity
from .._jwks_endpoint import JWKSEndpoint
from .._registry import JWKSFile, KeySource
from ._config import GatewayConfig, IssuerConfig, is_redis, is_url, issuer_key_parser

__all__ = ["IDP_MAX_JWKS_BYTES", "open_issuer_keys", "open_registry", "publish_own_keys", "source_ready"]


def open_registry(location: str, *, source: str = "<config>", namespace: str = "meshauth") -> KeySource:
    """The internal key registry: a :class:`meshauth.JWKSFile`, a JWKS endpoint for a URL, or Redis."""
    if is_redis(location):
        redis = _redis_module(source)
        return redis.RedisKeys(location, namespace)  # type: ignore[no-any-return]
    if not is_url(location):
        try:
            return JWKSFile(location)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{source}: registry: {exc.detail}", reason="invalid_config") from None
    try:
        return JWKSEndpoint(location)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{source}: registry: {exc.detail}", reason="invalid_config") from None


def publish_own_keys(config: GatewayConfig, **options: Any) -> ServiceIdentity:
    """With a Redis registry: this process's identity, its key generated in memory and published there.

    Every gateway process (``workers = N``) has its own key, renewed and rotated
    in Redis and deleted when the process stops (DESIGN section 10).
    """
    redis = _redis_module(config.source)
    publisher = redis.RedisPublisher(config.registry, config.registry_namespace)
    identity: ServiceIdentity = ServiceIdentity.ephemeral(config.service, publisher, **options)
    return identity


def _redis_module(source: str) -> ModuleType:
    try:
        from .. import redis  # noqa: PLC0415 - the optional extra, needed only for a redis:// registry
    except ImportError:
        raise ConfigurationError(
            f"{source}: registry: a redis:// registry needs the redis extra (pip install 'meshauth[redis]')",
            reason="invalid_config",
        ) from None
    return redis


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
