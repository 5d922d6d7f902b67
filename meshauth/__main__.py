"""``python -m meshauth`` and the ``meshauth`` console script.

The console script entry point is ``meshauth.__main__:main``; see
:mod:`meshauth.cli` for the commands and their exit codes.
"""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
