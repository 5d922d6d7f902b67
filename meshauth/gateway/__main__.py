"""``python -m meshauth.gateway --config gateway.toml``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ._serve import serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``--config`` and serve; returns the exit code of :func:`meshauth.gateway.serve`."""
    parser = argparse.ArgumentParser(
        prog="meshauth gateway", description="Run the meshauth gateway (a JWT-verifying reverse proxy)."
    )
    parser.add_argument("--config", required=True, help="the gateway's TOML configuration file")
    args = parser.parse_args(argv)
    return serve(args.config)


if __name__ == "__main__":
    sys.exit(main())
