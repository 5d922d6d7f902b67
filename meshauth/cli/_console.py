"""``meshauth console``: registered on the ``meshauth`` command's subparsers by :func:`add_parser`."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any

from .._exceptions import Unavailable
from ..console import AuditIndex, ConsoleServer, is_loopback, open_registry
from ._common import _UNIT_SECONDS, EXIT_OK, _command, _err, _out, _UsageError

__all__ = ["add_parser", "run"]

_LISTEN = re.compile(r"\A(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(?P<port>\d{1,5})\Z")
_DURATION = re.compile(r"\A(\d+)([smhd]?)\Z")


def _listen_arg(text: str) -> tuple[str, int]:
    """An argparse type: ``HOST:PORT`` (``[::1]:8090`` for IPv6)."""
    match = _LISTEN.match(text.strip())
    if match is None or int(match["port"]) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:8090)")
    return match["host"], int(match["port"])


def _duration_arg(text: str) -> float:
    """An argparse type: seconds, or ``N`` followed by s, m, h or d."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: use N[smhd], for example 7d")
    return float(int(match[1]) * _UNIT_SECONDS.get(match[2] or "s", 1))


def run(args: argparse.Namespace) -> int:
    """Serve the console until interrupted."""
    host, port = args.listen
    if not is_loopback(host) and not args.allow_remote:
        raise _UsageError(
            f"--listen {host}:{port} is reachable from other machines; the console shows every audit "
            "record without a login: bind to 127.0.0.1 (the default), or add --allow-remote"
        )
    for path in args.audit:
        if not os.path.exists(path):
            _err(f"warning: {path} does not exist yet; it is shown as missing until it appears")
    registry = None
    if args.registry is not None:
        try:
            registry = open_registry(
                args.registry, expiry_warning=args.expiry_warning, namespace=args.namespace, wait=args.wait
            )
        except Unavailable as exc:
            raise _UsageError(f"registry unavailable: {exc.detail}") from None
    server = ConsoleServer(AuditIndex(args.audit), registry, host, port)
    _out(f"meshauth console on {server.url}  (read-only; Ctrl-C to stop)")
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.index.close()
        if registry is not None:
            registry.close()
    return EXIT_OK


def add_parser(commands: Any) -> None:
    """Register ``console`` on the ``meshauth`` subparsers."""
    console = _command(
        commands,
        "console",
        "browse audit decisions, keys and transactions in a web page",
        "Serve a read-only web page over audit logs (JSON lines) and the key registry: the\n"
        "decisions as they arrive with filters, outcomes per minute, the keys with their age\n"
        "and expiry, and one transaction followed across every log. Bound to 127.0.0.1.",
        "  meshauth console --audit audit.jsonl --registry registry.json\n"
        "  meshauth console --audit gateway.jsonl --audit orders.jsonl --listen 127.0.0.1:9000",
    )
    console.add_argument(
        "--audit", action="append", required=True, metavar="FILE", help="an audit log (repeat for several)"
    )
    console.add_argument(
        "--registry", metavar="FILE|URL", help="the key registry: a JWKS file, an https URL or redis://HOST:PORT/DB"
    )
    console.add_argument("--namespace", default="meshauth", help="a Redis registry's namespace (default meshauth)")
    console.add_argument(
        "--wait", type=float, default=5.0, metavar="S", help="how long to wait for a Redis registry (default 5)"
    )
    console.add_argument(
        "--listen",
        type=_listen_arg,
        default=("127.0.0.1", 8090),
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8090)",
    )
    console.add_argument(
        "--allow-remote", action="store_true", help="allow a --listen address other machines can reach"
    )
    console.add_argument(
        "--expiry-warning",
        type=_duration_arg,
        default=7 * 86400.0,
        metavar="DURATION",
        help="flag keys expiring sooner than this (default 7d)",
    )
    console.set_defaults(run=run)
