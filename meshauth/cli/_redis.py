"""``meshauth registry --redis URL ...``: list, revoke, export and serve the registry kept on Redis."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .._exceptions import Unavailable
from ._common import (
    EXIT_OK,
    _add_json,
    _command,
    _duration,
    _optional_module,
    _out,
    _print_json,
    _print_table,
    _safe,
    _UsageError,
)


def redis_module() -> Any:
    """``meshauth.redis``, or a usage error naming the extra to install."""
    try:
        return _optional_module("meshauth.redis", "the Redis registry")
    except ImportError as exc:  # meshauth.redis explains which extra to install
        raise _UsageError(str(exc)) from None


def _require_redis(args: argparse.Namespace) -> str:
    if not args.redis:
        raise _UsageError(f"registry {args.action} works on the Redis registry: give --redis URL before the action")
    return str(args.redis)


def _keys(args: argparse.Namespace, *, follow: bool = False) -> Any:
    try:
        return redis_module().RedisKeys(_require_redis(args), args.namespace, follow=follow, startup_timeout=args.wait)
    except Unavailable as exc:
        raise _UsageError(f"registry unavailable: {exc.detail}") from None


def cmd_list(args: argparse.Namespace) -> int:
    """``registry --redis URL list``: services, kids, ages and time to expiry."""
    keys = _keys(args)
    try:
        now = time.time()
        rows = [
            {
                "service": record.owner,
                "kid": record.kid,
                "alg": record.alg,
                "age": int(now - record.not_before) if record.not_before is not None else None,
                "expires_in": int(record.expires - now) if record.expires is not None else None,
            }
            for service, records in sorted(keys.services().items())
            for record in sorted(records, key=lambda r: r.not_before or 0)
        ]
        problems = list(keys.problems)
    finally:
        keys.close()
    if args.json:
        _print_json({"namespace": args.namespace, "keys": rows, "problems": problems})
        return EXIT_OK
    if rows:
        _print_table(
            ("SERVICE", "KID", "ALG", "AGE", "EXPIRES IN"),
            [
                (
                    _safe(row["service"]),
                    row["kid"],
                    row["alg"],
                    "-" if row["age"] is None else _duration(row["age"]),
                    "-" if row["expires_in"] is None else _duration(row["expires_in"]),
                )
                for row in rows
            ],
        )
    else:
        _out(f"namespace {args.namespace}: no keys")
    for problem in problems:
        _out(f"warning: ignored: {_safe(problem)}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """``registry --redis URL export``: the registry as a standard JWKS document on stdout."""
    keys = _keys(args)
    try:
        _out(json.dumps(keys.to_jwks(), indent=2, sort_keys=True))
    finally:
        keys.close()
    return EXIT_OK


def _publisher(args: argparse.Namespace) -> Any:
    return redis_module().RedisPublisher(_require_redis(args), args.namespace)


def cmd_revoke(args: argparse.Namespace) -> int:
    """``registry --redis URL revoke KID``."""
    try:
        services = _publisher(args).revoke(args.kid)
    except Unavailable as exc:
        raise _UsageError(f"registry unavailable, nothing revoked: {exc.detail}") from None
    if args.json:
        _print_json({"kid": args.kid, "revoked": True, "services": services})
        return EXIT_OK
    where = ", ".join(_safe(s) for s in services) if services else "no service (recorded as revoked anyway)"
    _out(f"revoked {_safe(args.kid)}: removed from {where}; verifiers following the registry drop it now")
    return EXIT_OK


def cmd_revoke_service(args: argparse.Namespace) -> int:
    """``registry --redis URL revoke-service NAME``."""
    try:
        kids = _publisher(args).revoke_service(args.service)
    except Unavailable as exc:
        raise _UsageError(f"registry unavailable, nothing revoked: {exc.detail}") from None
    if args.json:
        _print_json({"service": args.service, "revoked": kids})
        return EXIT_OK
    _out(f"revoked {len(kids)} key(s) of {_safe(args.service)}: {', '.join(kids) or '-'}")
    _out(f"to keep it out, also disable its Redis user: ACL SETUSER {_safe(args.service)} off")
    return EXIT_OK


def serve_source(args: argparse.Namespace) -> tuple[Any, str]:
    """The key source ``registry serve`` publishes with ``--redis``, and its description."""
    return _keys(args, follow=True), f"the Redis registry (namespace {args.namespace})"


def add_actions(registry: argparse.ArgumentParser, actions: Any) -> None:
    """Add ``--redis`` to ``registry`` and the actions that only the Redis registry has."""
    registry.add_argument("--redis", metavar="URL", help="work on the registry kept on Redis (redis://...)")
    registry.add_argument("--namespace", default="meshauth", help="the Redis registry's namespace (default meshauth)")
    registry.add_argument("--wait", type=float, default=5.0, metavar="S", help="how long to wait for Redis (default 5)")
    # (action, summary, description, example, positional argument and its help, run)
    table: tuple[tuple[str, str, str, str, tuple[str, str, str] | None, Any], ...] = (
        (
            "revoke",
            "revoke a key for good (Redis)",
            "Revoke a key on the Redis registry: remove it wherever it is published, record\n"
            "a tombstone so it never comes back, and announce it (verifiers drop it at once).",
            "revoke 3kQ0...kid",
            ("kid", "KID", "the key id (see registry --redis URL list)"),
            cmd_revoke,
        ),
        (
            "revoke-service",
            "revoke every key of a service (Redis)",
            "Revoke every key of a service on the Redis registry (a compromised service:\n"
            "also disable its Redis ACL user).",
            "revoke-service orders",
            ("service", "NAME", "the service"),
            cmd_revoke_service,
        ),
        (
            "export",
            "print the registry as a JWKS (Redis)",
            "Print the Redis registry as a standard JWKS document, for PyJWT, joserfc,\njose and other libraries.",
            "export > registry.json",
            None,
            cmd_export,
        ),
    )
    for name, summary, description, example, positional, run in table:
        parser = _command(
            actions, name, summary, description, f"  meshauth registry --redis redis://127.0.0.1:6379/0 {example}"
        )
        if positional is not None:
            parser.add_argument(positional[0], metavar=positional[1], help=positional[2])
            _add_json(parser)
        parser.set_defaults(run=run)
