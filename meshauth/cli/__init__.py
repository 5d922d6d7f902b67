"""The ``meshauth`` command-line tool: keys, the registry, tokens.

Exit codes are part of the interface, so scripts can branch on them:

* ``0``: done (the token verified, the registry passed its checks, ...);
* ``1``: rejected (a token that does not verify, a registry with rotation
  errors, a token ``inspect`` finds malformed);
* ``2``: a usage or configuration error (bad arguments, an unreadable key,
  registry or file), including a registry that cannot be read at all: the
  token was then not judged.

Every command that a program would read takes ``--json``. Errors go to stderr.
Tokens are printed only where printing them is the point (``mint``); key
material and signatures never are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import __version__
from .._exceptions import ConfigurationError, KeysUnavailable
from . import _console, _doctor, _gateway, _keygen, _registry, _tokens
from ._common import EXIT_OK, EXIT_REJECTED, EXIT_USAGE, _err, _UsageError
from ._gateway import run_demo

__all__ = ["EXIT_OK", "EXIT_REJECTED", "EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``meshauth`` command."""
    parser = argparse.ArgumentParser(
        prog="meshauth",
        description="Service-to-service authentication with JWTs: keys, the key registry, tokens.",
        epilog=(
            "exit codes: 0 ok, 1 rejected, 2 usage or configuration error\n\n"
            "example:\n"
            "  meshauth keygen --service orders --out keys\n"
            "  meshauth registry add registry.json keys/orders.jwk.json\n"
            '  meshauth verify "$(meshauth mint --key keys/orders.pem --service orders --aud payments)" \\\n'
            "      --registry registry.json --aud payments"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"meshauth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in (
        _keygen.add_parser,
        _registry.add_parser,
        _tokens.add_parser,
        _gateway.add_parser,
        _doctor.add_parser,
        _console.add_parser,
    ):
        register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``meshauth`` command with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"]:
        return run_demo(arguments[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # argparse: 0 after --help/--version, 2 on a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.run(args))
    except _UsageError as exc:
        _err(f"error: {exc}")
    except KeysUnavailable as exc:
        _err(f"error: registry unavailable, the token was not judged: {exc}")
    except ConfigurationError as exc:
        _err(f"error: {exc}")
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        _err(f"error: {where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE
