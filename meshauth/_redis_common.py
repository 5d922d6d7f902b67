"""What the Redis registry's reader, writers and replay cache share: names, connections, errors.

The data layout is DESIGN section 10. Every key carries the hash tag ``{ns}``,
so a whole namespace lives in one Redis Cluster slot and transactions work.
redis-py is an optional dependency (the ``redis`` extra), imported here only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import re
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any, Final

from ._exceptions import ConfigurationError, MeshAuthError, Unavailable

__all__ = ["SERVICE_NAME", "Namespace", "backoff", "connect", "describe", "load_redis", "redis_errors"]

SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAMESPACE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEFAULT_TIMEOUT: Final = 2.0
EVENT_OPS: Final = frozenset({"publish", "renew", "revoke", "delete"})


def load_redis() -> ModuleType:
    """The ``redis`` module, or an error naming the extra that provides it."""
    try:
        import redis  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError:
        raise ImportError(
            "meshauth.redis needs redis-py: install the 'redis' extra (pip install 'meshauth[redis]')"
        ) from None
    return redis


@dataclasses.dataclass(frozen=True, slots=True)
class Namespace:
    """The key names of one registry namespace (DESIGN section 10)."""

    name: str = "meshauth"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAMESPACE.fullmatch(self.name):
            raise ConfigurationError(
                "a Redis namespace is 1-64 characters from A-Z a-z 0-9 . _ -",
                expected="e.g. 'meshauth'",
                actual=str(self.name)[:80],
            )

    @property
    def services(self) -> str:
        return f"{{{self.name}}}:services"

    @property
    def events(self) -> str:
        return f"{{{self.name}}}:events"

    @property
    def revoked(self) -> str:
        return f"{{{self.name}}}:revoked"

    def keys(self, service: str) -> str:
        return f"{{{self.name}}}:keys:{service}"

    def jti(self, issuer: str, jti: str) -> str:
        return f"{{{self.name}}}:jti:{issuer}:{jti}"


def check_service(name: Any) -> str:
    """``name`` if it is a valid service name, else ``ConfigurationError``."""
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        raise ConfigurationError(
            "not a valid service name",
            expected="[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
            actual=repr(name)[:80],
        )
    return name


def connect(client_or_url: Any, *, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """A ``redis.Redis`` client from a URL (``redis://``, ``rediss://``, ``unix://``) or the client given."""
    redis = load_redis()
    if isinstance(client_or_url, str):
        try:
            return redis.Redis.from_url(client_or_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        except ValueError as exc:
            raise ConfigurationError(f"not a usable Redis URL: {exc}", expected="redis://host:port/db") from None
    if not isinstance(client_or_url, redis.Redis | redis.cluster.RedisCluster):
        raise TypeError("client_or_url is a redis.Redis or redis.cluster.RedisCluster client, or a redis:// URL")
    return client_or_url


def is_cluster(client: Any) -> bool:
    return isinstance(client, load_redis().cluster.RedisCluster)


def dedicated(client: Any, *, timeout: float, key: str) -> Any:
    """A new client on its own connection, for blocking reads of ``key``, with the settings of ``client``.

    For Redis Cluster it connects to the node that holds ``key``'s slot (the
    whole namespace, thanks to the hash tag); ask again after a failover.
    """
    redis = load_redis()
    if is_cluster(client):
        client = client.get_node_from_key(key).redis_connection
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs["socket_timeout"] = timeout
    new_pool = redis.ConnectionPool(connection_class=pool.connection_class, max_connections=2, **kwargs)
    return redis.Redis(connection_pool=new_pool)


def describe(client: Any) -> str:
    """Where ``client`` connects, without credentials: ``redis 127.0.0.1:6379/0``."""
    if is_cluster(client):
        nodes = client.get_nodes()
        return f"redis cluster {nodes[0].host}:{nodes[0].port} (+{len(nodes) - 1} nodes)" if nodes else "redis cluster"
    pool = client.connection_pool
    kwargs = pool.connection_kwargs
    if getattr(pool, "service_name", None):  # a Sentinel-managed pool
        return f"redis sentinel service {pool.service_name}/{kwargs.get('db', 0)}"
    if "path" in kwargs:
        return f"redis unix:{kwargs['path']}"
    return f"redis {kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


@contextlib.contextmanager
def redis_errors(client: Any, command: str, key: str) -> Iterator[None]:
    """Turn redis-py errors into meshauth ones naming ``command`` and ``key`` (never a credential).

    An ACL denial or a wrong password is a :class:`ConfigurationError`; a
    connection failure or timeout is :class:`Unavailable` (callers re-raise
    their own subclass).
    """
    redis = load_redis()
    try:
        yield
    except MeshAuthError:
        raise
    except redis.exceptions.ResponseError as exc:
        denied = isinstance(exc, redis.exceptions.NoPermissionError | redis.exceptions.AuthenticationError)
        if denied or "NOPERM" in str(exc) or "NOAUTH" in str(exc):
            raise ConfigurationError(
                f"{describe(client)} refused {command} on {key}: {_first_line(exc)}",
                reason="redis_permission",
                expected=f"an ACL user allowed to run {command} on {key}",
                actual=_first_line(exc),
            ) from None
        raise Unavailable(f"{describe(client)}: {command} on {key} failed: {_first_line(exc)}") from exc
    except (redis.exceptions.RedisError, OSError) as exc:  # connection, timeout, cluster down, ...
        raise Unavailable(
            f"{describe(client)} unreachable during {command} on {key}: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def wait_for_redis(
    attempt: Callable[[], None], timeout: float, failure: Callable[[Unavailable], MeshAuthError]
) -> None:
    """Run ``attempt`` until it stops raising ``Unavailable``, for at most ``timeout`` seconds.

    A :class:`ConfigurationError` (an ACL denial, a bad password) is final at
    once; after the deadline, ``failure(last error)`` is raised.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            attempt()
            return
        except Unavailable as exc:
            if time.monotonic() + delay > deadline:
                raise failure(exc) from None
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def backoff(failures: int, *, base: float, cap: float, doublings: int) -> float:
    """Seconds to wait after ``failures`` failures in a row (at least 1): exponential, capped, jittered.

    ``base`` doubles with each failure, at most ``doublings`` times and to at most ``cap``, then is
    spread over 0.5x-1.5x so that many replicas or verifiers do not retry in step.
    """
    return min(cap, base * 2.0 ** min(failures, doublings)) * random.uniform(0.5, 1.5)  # noqa: S311 - jitter only
