"""``python -m meshauth.gateway --config gateway.toml``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._check import check
from ._serve import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--config`` and serve; returns the exit code of :func:`meshauth.gateway.serve`."""
    parser = argparse.ArgumentParser(
        prog="meshauth gateway", description="Run the meshauth gateway (a JWT-verifying reverse proxy)."
    )
    parser.add_argument("--config", required=True, help="the gateway's TOML configuration file")
    parser.add_argument("--check", action="store_true", help="check the configuration and its key sets; exit 0 or 1")
    args = parser.parse_args(argv)
    return check(args.config) if args.check else serve(args.config)


if __name__ == "__main__":
    sys.exit(main())
