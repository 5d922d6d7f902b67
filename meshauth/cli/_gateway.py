"""``meshauth gateway`` and the ``demo`` entry in the overview."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import (
    EXIT_OK,
    EXIT_USAGE,
    _command,
    _err,
    _optional_module,
)


def run_demo(argv: list[str]) -> int:
    """``meshauth demo ...``: hands its arguments to the demo's own parser."""
    try:
        # Imported on use: the demo pulls in the whole stack, which other commands don't need.
        from . import _demo  # noqa: PLC0415
    except ModuleNotFoundError as exc:
        _err(f"demo not available: it needs the {exc.name!r} package (pip install 'meshauth[demo]')")
        return EXIT_USAGE
    return int(_demo.main(argv))


def _cmd_gateway(args: argparse.Namespace) -> int:
    gateway = _optional_module("meshauth.gateway", "gateway")
    result = gateway.check(args.config) if args.check else gateway.serve(args.config)
    return EXIT_OK if result is None else int(result)


def add_parser(commands: Any) -> None:
    """Register ``demo`` and ``gateway`` on the ``meshauth`` subparsers."""
    # Listed for the overview only: main() hands "demo ..." to the demo module untouched.
    _command(
        commands,
        "demo",
        "run the end-to-end demo",
        "Run the one-command demo (its own options: meshauth demo --help).",
        "  meshauth demo",
    )

    gateway = _command(
        commands,
        "gateway",
        "run the delegating API gateway",
        "Run the gateway described by a TOML configuration file. Needs meshauth[gateway].",
        "  meshauth gateway --config gateway.toml\n  meshauth gateway --check --config gateway.toml",
    )
    gateway.add_argument("--config", required=True, metavar="FILE", help="the gateway's TOML configuration")
    gateway.add_argument(
        "--check",
        action="store_true",
        help="validate the file, load the key, reach the registry and every issuer's key set; exit 0 or 1",
    )
    gateway.set_defaults(run=_cmd_gateway)
